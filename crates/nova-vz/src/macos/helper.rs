//! `nova-vz-vmm`'s `main`: one VM, two sockets, exit when the VM stops.
//!
//! 1. Read the [`VzMachineSpec`] (`--spec`), build and validate the VZ
//!    configuration, make the VM on its own serial queue with a delegate
//!    that reports its end.
//! 2. Cold start it, or restore the saved state and resume it.
//! 3. Listen on `--control` ([`crate::control`]) and `--vsock`
//!    ([`crate::vsock`]); the runtime connects once the control socket
//!    exists, so an answering socket means a running guest.
//! 4. Exit when the guest stops (`guestDidStopVirtualMachine:`), VZ stops
//!    it on an error (`virtualMachine:didStopWithError:`), or the host asks
//!    for a `stop`: the runtime sees its VMM process exit. A killed helper
//!    takes its VM with it (VZ VMs live inside their process).
//!
//! Diagnostics go to stderr (the sandbox's `vmm.log`); the guest console is
//! stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::{AnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSError, NSObject, NSObjectProtocol};
use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineDelegate};
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::machine::{self, VzMachine};
use super::queue::VmQueue;
use crate::backend::HelperArgs;
use crate::control::{ControlRequest, ControlResponse, read_line, write_line};
use crate::error::VzFailure;
use crate::spec::{VzMachineSpec, machine_id_path};

/// The helper's entry point.
pub fn main() -> ExitCode {
    let args = match HelperArgs::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "nova-vz-vmm: {e}\nusage: nova-vz-vmm --spec VZ.JSON --control API.SOCK --vsock VSOCK.SOCK"
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nova-vz-vmm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(reason) => {
            eprintln!("nova-vz-vmm: {reason}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("nova-vz-vmm: {failure}");
            ExitCode::FAILURE
        }
    }
}

/// Why the VM ended, once it has.
type Ended = watch::Sender<Option<String>>;

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and this class does
    // not implement `Drop`.
    #[unsafe(super(NSObject))]
    #[name = "NovaVzStopWatcher"]
    #[ivars = Ended]
    struct StopWatcher;

    unsafe impl NSObjectProtocol for StopWatcher {}

    unsafe impl VZVirtualMachineDelegate for StopWatcher {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _vm: &VZVirtualMachine) {
            self.ivars()
                .send_replace(Some("the guest stopped its VM".to_owned()));
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _vm: &VZVirtualMachine, error: &NSError) {
            self.ivars().send_replace(Some(format!(
                "Virtualization.framework stopped the VM: {}",
                machine::failure(error)
            )));
        }
    }
);

impl StopWatcher {
    fn new(ended: Ended) -> Retained<Self> {
        let this = Self::alloc().set_ivars(ended);
        // SAFETY: NSObject's `init` on a freshly allocated instance whose
        // ivars are set.
        unsafe { msg_send![super(this), init] }
    }
}

async fn run(args: HelperArgs) -> Result<String, VzFailure> {
    let text = std::fs::read(&args.spec)
        .map_err(|e| VzFailure::helper(format!("cannot read {}: {e}", args.spec.display())))?;
    let spec: VzMachineSpec = serde_json::from_slice(&text)
        .map_err(|e| VzFailure::helper(format!("{} is not a VM spec: {e}", args.spec.display())))?;
    let machine_id = machine::machine_identifier(&spec)?;
    let machine_id_bytes = machine::machine_identifier_bytes(&machine_id);
    let config = machine::configuration(&spec, &machine_id)?;

    let queue = VmQueue::new("org.novasandbox.vz");
    let (ended_tx, mut ended) = watch::channel(None);
    let watcher = ProtocolObject::from_retained(StopWatcher::new(ended_tx));
    // SAFETY: the watcher is only used by the VM, which calls it on this
    // queue.
    let watcher = unsafe { queue.adopt(watcher) };
    // `watcher` stays alive until `run` returns: VZ holds delegates weakly.
    let vm = VzMachine::new(config, queue, watcher.clone()).await?;
    match &spec.restore {
        Some(state) => {
            vm.restore(state).await?;
            vm.resume().await?;
        }
        None => vm.start().await?,
    }
    let bind = |path: &PathBuf| {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path)
            .map_err(|e| VzFailure::helper(format!("cannot listen on {}: {e}", path.display())))
    };
    let vsock = bind(&args.vsock)?;
    let control = bind(&args.control)?;
    let machine_id_bytes = Arc::new(machine_id_bytes);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let reason = loop {
        tokio::select! {
            changed = ended.changed() => {
                let reason = ended.borrow().clone();
                match (changed, reason) {
                    (_, Some(reason)) => break reason,
                    (Err(_), None) => break "the VM's delegate went away".to_owned(),
                    (Ok(()), None) => {}
                }
            }
            _ = stop_rx.changed() => break "stopped on request".to_owned(),
            accepted = control.accept() => match accepted {
                Ok((stream, _)) => {
                    let (vm, ids, stop) = (vm.clone(), machine_id_bytes.clone(), stop_tx.clone());
                    tokio::spawn(serve_control(stream, vm, ids, stop));
                }
                Err(e) => eprintln!("nova-vz-vmm: control accept failed: {e}"),
            },
            accepted = vsock.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(relay(stream, vm.clone()));
                }
                Err(e) => eprintln!("nova-vz-vmm: vsock accept failed: {e}"),
            },
        }
    };
    drop(watcher);
    Ok(reason)
}

/// Serves one control connection, one request at a time.
async fn serve_control(
    stream: UnixStream,
    vm: VzMachine,
    machine_id: Arc<Vec<u8>>,
    stop: watch::Sender<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let request = match read_line::<_, ControlRequest>(&mut read).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                eprintln!("nova-vz-vmm: bad control request: {e}");
                return;
            }
        };
        let stopping = request == ControlRequest::Stop;
        let outcome = match request {
            ControlRequest::State => Ok(()),
            ControlRequest::Pause => vm.pause().await,
            ControlRequest::Resume => vm.resume().await,
            ControlRequest::Save { path } => match vm.save(&path).await {
                Ok(()) => {
                    std::fs::write(machine_id_path(&path), machine_id.as_slice()).map_err(|e| {
                        VzFailure::helper(format!("cannot write the machine identifier: {e}"))
                    })
                }
                Err(failure) => Err(failure),
            },
            ControlRequest::RequestStop => vm.request_stop().await,
            ControlRequest::Stop => vm.stop().await,
        };
        let response = match outcome.and(vm.state().await) {
            Ok(state) => ControlResponse::Done { state },
            Err(failure) => ControlResponse::Failed { failure },
        };
        if write_line(&mut write, &response).await.is_err() {
            return;
        }
        if stopping {
            let _ = stop.send(true);
            return;
        }
    }
}

/// Serves one vsock connection: the handshake, then bytes both ways
/// between the host's stream and the guest's socket.
async fn relay(mut host: UnixStream, vm: VzMachine) {
    let port = match crate::vsock::read_connect(&mut host).await {
        Ok(Some(port)) => port,
        Ok(None) => return,
        Err(e) => {
            eprintln!("nova-vz-vmm: bad vsock handshake: {e}");
            return;
        }
    };
    // A guest that does not accept (yet) gets the stream closed unanswered.
    let Ok(connection) = vm.connect(port).await else {
        return;
    };
    let mut guest = match guest_stream(&connection) {
        Ok(guest) => guest,
        Err(e) => {
            eprintln!("nova-vz-vmm: cannot use the guest's vsock socket: {e}");
            return;
        }
    };
    if crate::vsock::write_ok(&mut host, port).await.is_err() {
        return;
    }
    // Ends when either side closes; the connection is released after.
    let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
    drop(connection);
}

/// The guest connection's socket as a tokio stream (a stream socket: the
/// `UnixStream` type only reads and writes it).
fn guest_stream(connection: &machine::GuestConnection) -> std::io::Result<UnixStream> {
    let socket = std::os::unix::net::UnixStream::from(connection.fd.try_clone()?);
    socket.set_nonblocking(true)?;
    UnixStream::from_std(socket)
}
