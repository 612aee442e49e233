//! The local terminal for `nova exec -t`: raw mode that is always undone,
//! and its size.
//!
//! [`RawMode::enter`] saves the terminal's settings and switches it to raw
//! mode (no echo, no line editing, no signal keys: Ctrl-C reaches the guest
//! as a byte); dropping the guard restores the saved settings, so every exit
//! path (a return, `?`, a panic's unwinding) leaves the terminal as it was.

use std::io;

use rustix::termios::{self, OptionalActions, Termios};

/// The local terminal in raw mode until dropped.
#[derive(Debug)]
pub(crate) struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Switches stdin's terminal to raw mode; `None` when stdin is not a
    /// terminal (nothing to change).
    pub(crate) fn enter() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !termios::isatty(&stdin) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// The size (rows, columns) of the terminal on stdout or stdin, if either
/// is one.
pub(crate) fn size() -> Option<(u16, u16)> {
    let of =
        |ws: termios::Winsize| (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col));
    termios::tcgetwinsize(io::stdout())
        .ok()
        .and_then(of)
        .or_else(|| termios::tcgetwinsize(io::stdin()).ok().and_then(of))
}

/// Whether stdin is a terminal.
pub(crate) fn stdin_is_tty() -> bool {
    termios::isatty(io::stdin())
}
