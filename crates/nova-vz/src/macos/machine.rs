//! One `VZVirtualMachine`: its configuration, built from a
//! [`VzMachineSpec`], and its operations as async functions over the
//! [queue bridge](super::queue).
//!
//! Every VZ call is `unsafe` in `objc2-virtualization` (the bindings cannot
//! check Apple's threading and argument rules); each block below says
//! which rule it keeps. The configuration objects are plain values until
//! the VM copies them (`initWithConfiguration:queue:` copies its
//! configuration), so they are built on the calling thread; everything on
//! the VM itself runs on its queue.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use block2::RcBlock;
use objc2::rc::Retained;
use objc2::{AnyThread, sel};
use objc2_foundation::{NSArray, NSData, NSError, NSFileHandle, NSObjectProtocol, NSString, NSURL};
use objc2_virtualization::{
    VZDiskImageStorageDeviceAttachment, VZEntropyDeviceConfiguration,
    VZFileHandleSerialPortAttachment, VZGenericMachineIdentifier, VZGenericPlatformConfiguration,
    VZLinuxBootLoader, VZMACAddress, VZMemoryBalloonDeviceConfiguration,
    VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration, VZSerialPortConfiguration,
    VZSocketDeviceConfiguration, VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioNetworkDeviceConfiguration, VZVirtioSocketConnection, VZVirtioSocketDevice,
    VZVirtioSocketDeviceConfiguration, VZVirtioTraditionalMemoryBalloonDeviceConfiguration,
    VZVirtualMachine, VZVirtualMachineConfiguration, VZVirtualMachineDelegate,
};

use super::queue::{OnQueue, VmQueue};
use crate::error::VzFailure;
use crate::spec::{VzLimits, VzMachineSpec, machine_id_path};
use crate::state::VzState;

/// VZ's limits on this Mac.
pub fn limits() -> VzLimits {
    // SAFETY: class properties without arguments, documented as callable
    // from any thread (they describe the host, not a VM).
    unsafe {
        VzLimits {
            min_memory_bytes: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory_bytes: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
            min_cpus: u32::try_from(VZVirtualMachineConfiguration::minimumAllowedCPUCount())
                .unwrap_or(1),
            max_cpus: u32::try_from(VZVirtualMachineConfiguration::maximumAllowedCPUCount())
                .unwrap_or(u32::MAX),
        }
    }
}

/// The typed failure of an `NSError`.
pub fn failure(error: &NSError) -> VzFailure {
    VzFailure::from_ns_error_parts(
        &error.domain().to_string(),
        error.code() as i64,
        &error.localizedDescription().to_string(),
    )
}

/// The failure a completion handler's error argument means: `None` for
/// nil (success).
///
/// # Safety
///
/// `error` is nil or points to a valid `NSError` for the duration of the
/// call (what VZ passes its completion handlers).
unsafe fn failure_of(error: *mut NSError) -> Option<VzFailure> {
    // SAFETY: by the caller's contract, non-null means valid.
    unsafe { error.as_ref() }.map(failure)
}

fn file_url(path: &Path) -> Retained<NSURL> {
    NSURL::fileURLWithPath(&NSString::from_str(&path.to_string_lossy()))
}

/// Builds and validates the VM's configuration. The guest console goes to
/// this process's stdout (which the runtime caps into `console.log`).
/// `machine_id` is the generic platform's identifier (kept for restores).
///
/// # Errors
///
/// VZ's error when a disk cannot be attached or the configuration does not
/// validate (which also catches a missing entitlement).
pub fn configuration(
    spec: &VzMachineSpec,
    machine_id: &VZGenericMachineIdentifier,
) -> Result<Retained<VZVirtualMachineConfiguration>, VzFailure> {
    let config;
    // SAFETY: plain initialisers and setters of configuration objects this
    // function owns and no VM uses yet (VZ copies the configuration when the
    // VM is made); every argument is a live object of the type the setter
    // takes, and the sizes were checked against VZ's limits by the spec.
    unsafe {
        config = VZVirtualMachineConfiguration::new();
        let loader = VZLinuxBootLoader::initWithKernelURL(
            VZLinuxBootLoader::alloc(),
            &file_url(&spec.kernel),
        );
        loader.setCommandLine(&NSString::from_str(&spec.cmdline));
        config.setBootLoader(Some(&loader));
        config.setMemorySize(spec.memory_bytes);
        config.setCPUCount(spec.cpus as usize);

        let platform = VZGenericPlatformConfiguration::new();
        platform.setMachineIdentifier(machine_id);
        config.setPlatform(&platform);

        let mut disks: Vec<Retained<VZStorageDeviceConfiguration>> = Vec::new();
        for disk in &spec.disks {
            let attachment = VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
                VZDiskImageStorageDeviceAttachment::alloc(),
                &file_url(&disk.path),
                disk.read_only,
            )
            .map_err(|e| failure(&e))?;
            let block = VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                &attachment,
            );
            disks.push(Retained::into_super(block));
        }
        config.setStorageDevices(&NSArray::from_retained_slice(&disks));

        let vsock: Retained<VZSocketDeviceConfiguration> =
            Retained::into_super(VZVirtioSocketDeviceConfiguration::new());
        config.setSocketDevices(&NSArray::from_retained_slice(&[vsock]));

        if let Some(network) = &spec.network {
            let nic = VZVirtioNetworkDeviceConfiguration::new();
            nic.setAttachment(Some(&VZNATNetworkDeviceAttachment::new()));
            let mac = VZMACAddress::initWithString(
                VZMACAddress::alloc(),
                &NSString::from_str(&network.mac),
            )
            .ok_or_else(|| VzFailure::helper(format!("bad MAC address {:?}", network.mac)))?;
            nic.setMACAddress(&mac);
            let nic: Retained<VZNetworkDeviceConfiguration> = Retained::into_super(nic);
            config.setNetworkDevices(&NSArray::from_retained_slice(&[nic]));
        }

        if spec.balloon {
            let balloon: Retained<VZMemoryBalloonDeviceConfiguration> =
                Retained::into_super(VZVirtioTraditionalMemoryBalloonDeviceConfiguration::new());
            config.setMemoryBalloonDevices(&NSArray::from_retained_slice(&[balloon]));
        }

        let entropy: Retained<VZEntropyDeviceConfiguration> =
            Retained::into_super(VZVirtioEntropyDeviceConfiguration::new());
        config.setEntropyDevices(&NSArray::from_retained_slice(&[entropy]));

        let console = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        let stdout = NSFileHandle::fileHandleWithStandardOutput();
        let attachment =
            VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
                VZFileHandleSerialPortAttachment::alloc(),
                None,
                Some(&stdout),
            );
        console.setAttachment(Some(&attachment));
        let console: Retained<VZSerialPortConfiguration> = Retained::into_super(console);
        config.setSerialPorts(&NSArray::from_retained_slice(&[console]));

        config.validateWithError().map_err(|e| failure(&e))?;
        if spec.restore.is_some() {
            // The host checks the macOS version first; a macOS 13 VM would
            // not even know the selector, so say so rather than crash.
            if !config.respondsToSelector(sel!(validateSaveRestoreSupportWithError:)) {
                return Err(save_restore_unsupported());
            }
            config
                .validateSaveRestoreSupportWithError()
                .map_err(|e| failure(&e))?;
        }
    }
    Ok(config)
}

fn save_restore_unsupported() -> VzFailure {
    VzFailure::helper("saving and restoring a VZ machine state needs macOS 14 or later")
}

/// The platform identifier of the VM: the one saved next to the state
/// being restored (VZ restores a state only into the same machine), else a
/// new one.
///
/// # Errors
///
/// A helper failure when the saved identifier cannot be read or parsed.
pub fn machine_identifier(
    spec: &VzMachineSpec,
) -> Result<Retained<VZGenericMachineIdentifier>, VzFailure> {
    let Some(state) = &spec.restore else {
        // SAFETY: a plain constructor.
        return Ok(unsafe { VZGenericMachineIdentifier::new() });
    };
    let path = machine_id_path(state);
    let bytes = std::fs::read(&path).map_err(|e| {
        VzFailure::helper(format!(
            "cannot read the machine identifier {}: {e}",
            path.display()
        ))
    })?;
    let data = NSData::with_bytes(&bytes);
    // SAFETY: an initialiser given a live NSData; it returns nil (None) for
    // data that is not an identifier.
    unsafe {
        VZGenericMachineIdentifier::initWithDataRepresentation(
            VZGenericMachineIdentifier::alloc(),
            &data,
        )
    }
    .ok_or_else(|| VzFailure::helper(format!("{} is not a machine identifier", path.display())))
}

/// The bytes of `id`, to save next to a machine state.
pub fn machine_identifier_bytes(id: &VZGenericMachineIdentifier) -> Vec<u8> {
    // SAFETY: a property read of an immutable value object.
    unsafe { id.dataRepresentation() }.to_vec()
}

/// One VM, on its queue.
#[derive(Debug, Clone)]
pub struct VzMachine {
    queue: VmQueue,
    vm: OnQueue<VZVirtualMachine>,
}

impl VzMachine {
    /// Makes the VM from `config` on `queue`, with `delegate` (kept by the
    /// caller: VZ holds its delegate weakly).
    pub async fn new(
        config: Retained<VZVirtualMachineConfiguration>,
        queue: VmQueue,
        delegate: OnQueue<objc2::runtime::ProtocolObject<dyn VZVirtualMachineDelegate>>,
    ) -> Result<Self, VzFailure> {
        // SAFETY: the configuration is not yet any VM's; it only crosses to
        // the queue to be copied there.
        let config = unsafe { queue.adopt(config) };
        let target = queue.clone();
        let vm = queue
            .run(move |reply| {
                // SAFETY: on the queue (inside `run`); the configuration was
                // validated; the queue is serial, as
                // `initWithConfiguration:queue:` requires; the delegate is a
                // live object implementing the protocol.
                let vm = unsafe {
                    let vm = VZVirtualMachine::initWithConfiguration_queue(
                        VZVirtualMachine::alloc(),
                        config.get(),
                        target.dispatch_queue(),
                    );
                    vm.setDelegate(Some(delegate.get()));
                    target.adopt(vm)
                };
                reply.send(vm);
            })
            .await?;
        Ok(Self { queue, vm })
    }

    /// The VM's state.
    pub async fn state(&self) -> Result<VzState, VzFailure> {
        let vm = self.vm.clone();
        self.queue
            .run(move |reply| {
                // SAFETY: on the queue; a property read.
                let raw = unsafe { vm.get().state() };
                reply.send(VzState::from_raw(raw.0 as i64));
            })
            .await
    }

    /// Runs one of VZ's `…WithCompletionHandler:` operations and waits for
    /// its handler.
    async fn complete(
        &self,
        start: impl FnOnce(&VZVirtualMachine, &block2::DynBlock<dyn Fn(*mut NSError)>) + Send + 'static,
    ) -> Result<(), VzFailure> {
        let vm = self.vm.clone();
        self.queue
            .run(move |reply| {
                let done = RcBlock::new(move |error: *mut NSError| {
                    // SAFETY: VZ passes its completion handlers nil or a
                    // valid NSError.
                    let result = match unsafe { failure_of(error) } {
                        None => Ok(()),
                        Some(failure) => Err(failure),
                    };
                    reply.send(result);
                });
                // SAFETY: on the queue (inside `run`).
                start(unsafe { vm.get() }, &done);
            })
            .await?
    }

    /// `startWithCompletionHandler:`.
    pub async fn start(&self) -> Result<(), VzFailure> {
        // SAFETY: called on the VM's queue by `complete`, with a completion
        // block of the signature VZ declares (the same holds for each
        // operation below).
        self.complete(|vm, done| unsafe { vm.startWithCompletionHandler(done) })
            .await
    }

    /// `pauseWithCompletionHandler:`.
    pub async fn pause(&self) -> Result<(), VzFailure> {
        // SAFETY: see `start`.
        self.complete(|vm, done| unsafe { vm.pauseWithCompletionHandler(done) })
            .await
    }

    /// `resumeWithCompletionHandler:`.
    pub async fn resume(&self) -> Result<(), VzFailure> {
        // SAFETY: see `start`.
        self.complete(|vm, done| unsafe { vm.resumeWithCompletionHandler(done) })
            .await
    }

    /// `stopWithCompletionHandler:`: stops at once.
    pub async fn stop(&self) -> Result<(), VzFailure> {
        // SAFETY: see `start`.
        self.complete(|vm, done| unsafe { vm.stopWithCompletionHandler(done) })
            .await
    }

    /// Whether the VM knows `selector` (a method newer than this macOS
    /// answers no).
    async fn responds(&self, selector: objc2::runtime::Sel) -> Result<bool, VzFailure> {
        let vm = self.vm.clone();
        self.queue
            .run(move |reply| {
                // SAFETY: on the queue; `respondsToSelector:` only reads the
                // class's method table.
                reply.send(unsafe { vm.get() }.respondsToSelector(selector));
            })
            .await
    }

    /// `saveMachineStateToURL:completionHandler:` (paused VM, macOS 14+).
    pub async fn save(&self, path: &Path) -> Result<(), VzFailure> {
        if !self
            .responds(sel!(saveMachineStateToURL:completionHandler:))
            .await?
        {
            return Err(save_restore_unsupported());
        }
        let url = Url(file_url(path));
        // SAFETY: see `start`; the URL is a live file URL.
        self.complete(move |vm, done| unsafe {
            vm.saveMachineStateToURL_completionHandler(&url.0, done)
        })
        .await
    }

    /// `restoreMachineStateFromURL:completionHandler:` (stopped VM, macOS
    /// 14+); the VM is paused afterwards.
    pub async fn restore(&self, path: &Path) -> Result<(), VzFailure> {
        if !self
            .responds(sel!(restoreMachineStateFromURL:completionHandler:))
            .await?
        {
            return Err(save_restore_unsupported());
        }
        let url = Url(file_url(path));
        // SAFETY: see `start`; the URL is a live file URL.
        self.complete(move |vm, done| unsafe {
            vm.restoreMachineStateFromURL_completionHandler(&url.0, done)
        })
        .await
    }

    /// `requestStopWithError:`: asks the guest to power off.
    pub async fn request_stop(&self) -> Result<(), VzFailure> {
        let vm = self.vm.clone();
        self.queue
            .run(move |reply| {
                // SAFETY: on the queue.
                let result = unsafe { vm.get().requestStopWithError() };
                reply.send(result.map_err(|e| failure(&e)));
            })
            .await?
    }

    /// Connects to guest vsock `port` (`connectToPort:completionHandler:`)
    /// and returns a duplicate of the connection's socket, and the
    /// connection itself, which must be kept while the socket is used.
    pub async fn connect(&self, port: u32) -> Result<GuestConnection, VzFailure> {
        let vm = self.vm.clone();
        let queue = self.queue.clone();
        self.queue
            .run(move |reply| {
                // SAFETY: on the queue; a property read.
                let devices = unsafe { vm.get().socketDevices() };
                let Some(device) = devices
                    .firstObject()
                    .and_then(|d| d.downcast::<VZVirtioSocketDevice>().ok())
                else {
                    reply.send(Err(VzFailure::helper("the VM has no virtio socket device")));
                    return;
                };
                let done = RcBlock::new(
                    move |connection: *mut VZVirtioSocketConnection, error: *mut NSError| {
                        // SAFETY: VZ passes nil or a valid NSError.
                        if let Some(failure) = unsafe { failure_of(error) } {
                            reply.send(Err(failure));
                            return;
                        }
                        // SAFETY: without an error VZ passes a valid
                        // connection; retaining it keeps it (and its
                        // socket) alive past the handler.
                        let Some(connection) = (unsafe { Retained::retain(connection) }) else {
                            reply.send(Err(VzFailure::helper(
                                "VZ gave neither connection nor error",
                            )));
                            return;
                        };
                        // SAFETY: on the queue (completion handlers run
                        // there); the descriptor is open while the
                        // connection lives, which spans this borrow.
                        let fd = unsafe {
                            BorrowedFd::borrow_raw(connection.fileDescriptor()).try_clone_to_owned()
                        };
                        let result = fd
                            .map_err(|e| {
                                VzFailure::helper(format!("cannot duplicate the vsock socket: {e}"))
                            })
                            .map(|fd| GuestConnection {
                                fd,
                                // SAFETY: a VZ object of this VM, reached on
                                // its queue.
                                _connection: unsafe { queue.adopt(connection) },
                            });
                        reply.send(result);
                    },
                );
                // SAFETY: on the queue; a completion block of the declared
                // signature.
                unsafe { device.connectToPort_completionHandler(port, &done) };
            })
            .await?
    }
}

/// A connection to a guest vsock port.
#[derive(Debug)]
pub struct GuestConnection {
    /// A duplicate of the connection's socket.
    pub fd: OwnedFd,
    /// The connection, released (on the queue) when this is dropped.
    _connection: OnQueue<VZVirtioSocketConnection>,
}

/// A file URL on its way to the queue.
struct Url(Retained<NSURL>);

// SAFETY: NSURL is an immutable value class, documented as thread-safe.
unsafe impl Send for Url {}
