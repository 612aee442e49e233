"""Typed exceptions: the daemon's problem codes, one class each.

Every error the daemon answers is an RFC 9457 problem (``application/problem+json``)
with a stable ``code`` (``sandbox_not_found``, ``invalid_config``, ...). The SDK
raises the matching subclass of :class:`NovaError`, carrying ``status``,
``code`` and ``detail``; callers match on the class (or on ``code``), the
message is for people.

Errors that do not come from a problem document:

- :class:`DaemonUnavailable`: no daemon answers (and none could be started);
- :class:`BackendMismatch`: a provider class was asked for a backend the
  daemon does not run (``FirecrackerHypervisor`` against a QEMU daemon);
- :class:`CommandTimeout`: a command ran past its ``timeout`` and was killed
  (exit code 124). :meth:`Sandbox.run <novasandbox.core.Sandbox.run>`
  returns the result with ``timed_out`` set instead of raising;
  :meth:`Sandbox.execute_command <novasandbox.core.Sandbox.execute_command>`,
  which returns only stdout, raises it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "AgentError",
    "BackendMismatch",
    "BootTimeout",
    "Busy",
    "CommandTimeout",
    "DaemonUnavailable",
    "ExecBusy",
    "ExecNotFound",
    "FileConflict",
    "FileNotFound",
    "Forbidden",
    "HostError",
    "InvalidConfig",
    "InvalidPath",
    "InvalidRequest",
    "NotRunning",
    "NovaError",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaExceeded",
    "SandboxNotFound",
    "TemplateNotFound",
    "Unauthorized",
    "Unsupported",
    "VmmError",
    "error_from_problem",
]


class NovaError(Exception):
    """Base of every error the SDK raises.

    ``status`` is the HTTP status (0 when no response came), ``code`` the
    daemon's stable problem code (or an SDK code such as
    ``daemon_unavailable``), ``detail`` what went wrong and what to do.
    """

    code: str = "error"

    def __init__(
        self,
        detail: str,
        *,
        status: int = 0,
        code: str | None = None,
        title: str | None = None,
        retry_after_secs: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        if code is not None:
            self.code = code
        self.title = title
        self.retry_after_secs = retry_after_secs

    def __str__(self) -> str:
        prefix = f"{self.code}"
        if self.status:
            prefix += f" ({self.status})"
        return f"{prefix}: {self.detail}"


class InvalidRequest(NovaError):
    """The request could not be parsed (400)."""

    code = "invalid_request"


class InvalidConfig(NovaError, ValueError):
    """The sandbox config is out of range or not accepted (400).

    Also raised by the SDK itself, before any request, for a
    :class:`~novasandbox.core.SandboxConfig` field the daemon controls.
    """

    code = "invalid_config"


class InvalidPath(NovaError, ValueError):
    """A guest path is not absolute or contains NUL (400)."""

    code = "invalid_path"


class Unauthorized(NovaError):
    """No bearer token, or a wrong one (401): check ``NOVA_TOKEN``."""

    code = "unauthorized"


class Forbidden(NovaError):
    """The operator's policy forbids this (403)."""

    code = "forbidden"


class PermissionDenied(NovaError):
    """The guest denied access to the path (403)."""

    code = "permission_denied"


class SandboxNotFound(NovaError, LookupError):
    """No sandbox has this id (404)."""

    code = "sandbox_not_found"


class TemplateNotFound(NovaError, LookupError):
    """No template has this name (404)."""

    code = "template_not_found"


class ExecNotFound(NovaError, LookupError):
    """No exec has this id in the sandbox (404)."""

    code = "exec_not_found"


class FileNotFound(NovaError, FileNotFoundError):
    """The guest path does not exist (404)."""

    code = "file_not_found"


class NotRunning(NovaError):
    """The sandbox is not in a state that allows the operation (409)."""

    code = "not_running"


class FileConflict(NovaError):
    """The guest path is in the way: a directory, not a directory, not empty,
    or read-only (409)."""

    code = "file_conflict"


class ExecBusy(NovaError):
    """Another stream already follows this command (409)."""

    code = "exec_busy"


class PayloadTooLarge(NovaError):
    """The body, the output or a whole-file read is larger than allowed (413)."""

    code = "payload_too_large"


class QuotaExceeded(NovaError):
    """A limit of the operator's policy is reached (429)."""

    code = "quota_exceeded"


class Busy(NovaError):
    """Too many creates are waiting; retry after ``retry_after_secs`` (429)."""

    code = "busy"


class Unsupported(NovaError):
    """The backend cannot do this on this host (501)."""

    code = "unsupported"


class AgentError(NovaError):
    """The guest agent failed or broke off (502)."""

    code = "agent_error"


class VmmError(NovaError):
    """The VMM failed (500)."""

    code = "vmm_error"


class BootTimeout(NovaError, TimeoutError):
    """The guest did not become ready in time (504)."""

    code = "boot_timeout"


class HostError(NovaError):
    """A host resource (directory, network, process) failed (500)."""

    code = "host_error"


class DaemonUnavailable(NovaError, ConnectionError):
    """No daemon answers, and none could be started."""

    code = "daemon_unavailable"


class BackendMismatch(NovaError):
    """The daemon runs another backend than the provider class asked for."""

    code = "backend_mismatch"


class CommandTimeout(NovaError, TimeoutError):
    """A command ran past its timeout; its process group was killed (exit 124).

    ``stdout`` and ``stderr`` hold what it printed before that.
    """

    code = "command_timeout"

    def __init__(self, detail: str, *, stdout: str = "", stderr: str = "") -> None:
        super().__init__(detail)
        self.stdout = stdout
        self.stderr = stderr


_BY_CODE: dict[str, type[NovaError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidConfig,
        InvalidPath,
        Unauthorized,
        Forbidden,
        PermissionDenied,
        SandboxNotFound,
        TemplateNotFound,
        ExecNotFound,
        FileNotFound,
        NotRunning,
        FileConflict,
        ExecBusy,
        PayloadTooLarge,
        QuotaExceeded,
        Busy,
        Unsupported,
        AgentError,
        VmmError,
        BootTimeout,
        HostError,
    )
}


def error_from_problem(problem: dict[str, Any], status: int) -> NovaError:
    """The exception for a problem document (or any error body as a dict).

    Unknown codes (a newer daemon) become a plain :class:`NovaError` that
    still carries the code.
    """
    code = str(problem.get("code") or "error")
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    title = problem.get("title")
    retry = problem.get("retry_after_secs")
    cls = _BY_CODE.get(code, NovaError)
    return cls(
        detail,
        status=int(problem.get("status") or status),
        code=code,
        title=str(title) if title is not None else None,
        retry_after_secs=int(retry) if isinstance(retry, int) else None,
    )


def error_from_response(status: int, body: bytes) -> NovaError:
    """The exception for an error response: its problem document, or its text."""
    try:
        problem = json.loads(body)
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        return error_from_problem(problem, status)
    text = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return NovaError(text[:1024], status=status, code=f"http_{status}")
