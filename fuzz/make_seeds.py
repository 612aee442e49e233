#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/ (checked in).

The protocol seeds are cut from crates/nova-protocol/tests/wire_schema.txt,
the frozen encoding of every message, so they follow the wire format by
construction; rerun this after the schema changes. The rest are small
hand-written examples of what each peer or caller sends.
"""
import gzip
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent
SCHEMA = ROOT.parent / "crates/nova-protocol/tests/wire_schema.txt"
SEEDS = ROOT / "seeds"


def frames():
    out = []
    for line in SCHEMA.read_text().splitlines():
        if line.startswith("#") or ": " not in line:
            continue
        name, hexbytes = line.split(": ", 1)
        out.append((name, bytes.fromhex(hexbytes.strip())))
    return out


def with_id(frame, new_id):
    """The frame with its request id (the varint after the variant index)
    replaced by `new_id` (< 128), when that id is one byte long."""
    payload = frame[4:]
    if len(payload) < 2 or payload[1] >= 0x80:
        return frame
    payload = bytes([payload[0], new_id]) + payload[2:]
    return len(payload).to_bytes(4, "big") + payload


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main():
    fs = frames()
    by = lambda prefix: [f for n, f in fs if n.startswith(prefix)]
    hello = by("Hello:") or [f for n, f in fs if n == "Hello"]
    welcome = [f for n, f in fs if n == "HelloReply::Welcome"]
    refused = [f for n, f in fs if n == "HelloReply::Refused"]
    agent = by("AgentMessage::")
    client = by("ClientMessage::")

    # Host client decoding agent frames: chunk-size byte, reply, messages.
    for chunk in (0, 7, 63):
        write("agent_client_frames", f"welcome_all_c{chunk}", bytes([chunk]) + welcome[0] + b"".join(agent))
    write("agent_client_frames", "refused", b"\x03" + refused[0])
    for i, f in enumerate(agent):
        write("agent_client_frames", f"one_{i:02}", b"\x00" + welcome[0] + f)

    # Agent decoding host frames.
    for chunk in (0, 5, 63):
        write("agent_request_frames", f"hello_all_c{chunk}", bytes([chunk]) + hello[0] + b"".join(client))
    for i, f in enumerate(client):
        write("agent_request_frames", f"one_{i:02}", b"\x00" + hello[0] + f)
    write("agent_request_frames", "second_hello", b"\x00" + hello[0] + client[0] + hello[0])

    # The agent's routing: every request and follow-up; the same again
    # (each id reused while in flight ends the session); a second host.
    everything = b"".join(client)
    write("agent_dispatch", "all", b"\x00" + hello[0] + everything)
    write("agent_dispatch", "all_twice_c9", b"\x09" + hello[0] + everything * 2)
    write("agent_dispatch", "new_host", b"\x00" + hello[0] + everything + hello[0] + everything)
    for i, f in enumerate(client):
        write("agent_dispatch", f"one_{i:02}", b"\x00" + hello[0] + f + f)

    # The client's session: messages for the eight requests in flight.
    for rid in range(1, 9):
        write("agent_client_session", f"id{rid}", b"".join(with_id(f, rid) for f in agent))
    write("agent_client_session", "mixed", b"".join(with_id(f, 1 + i % 8) for i, f in enumerate(agent)))

    # QMP: greeting, capabilities, then the five commands, with events.
    greeting = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\n'
    event = b'{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\n'
    answers = [
        b'{"return": {}, "id": 1}\n',
        b'{"return": {"running": true, "singlestep": false, "status": "running"}, "id": 2}\n',
        b'{"return": [{"device": "vda", "stats": {"rd_bytes": 512, "wr_bytes": 4096}}], "id": 3}\n',
        event + b'{"return": {}, "id": 4}\n',
        b'{"error": {"class": "GenericError", "desc": "no"}, "id": 5}\n',
        b'{"return": {}, "id": 6}\n' + b'{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}\n',
    ]
    write("qmp_replies", "session", greeting + b"".join(answers))
    write("qmp_replies", "late_answer", greeting + b'{"return": {}, "id": 1}\n{"return": {}, "id": 1}\n' + answers[1])
    write("qmp_replies", "greeting_only", greeting)
    write("qmp_replies", "crash_blockstats_overflow", greeting + answers[0] + answers[1] + b'{"return": [{"stats": {"rd_bytes": 18446744073709551615}}, {"stats": {"rd_bytes": 1}}], "id": 3}\n')

    # Firecracker: API responses, metrics lines, vsock acknowledgements.
    def http(status, body=b"", reason=b"OK"):
        head = b"HTTP/1.1 %d %s\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n" % (status, reason)
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        else:
            head += b"Content-Length: 0\r\n"
        return head + b"\r\n" + body
    api = [
        http(200, b'{"id":"anonymous-instance","state":"Running","vmm_version":"1.7.0","app_name":"Firecracker"}'),
        http(200, b'{"firecracker_version":"1.7.0"}'),
        http(200, b'{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}'),
        http(200, b'{"target_pages":0,"actual_pages":0,"target_mib":0,"actual_mib":0,"swap_in":1,"free_memory":2}'),
        http(200, b'{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1}'),
        http(204, reason=b"No Content"),
        http(400, b'{"fault_message":"The requested operation is not supported after starting the microVM."}', b"Bad Request"),
    ]
    write("firecracker_api", "api_session", b"\x00" + b"--next--\n".join(api))
    write("firecracker_api", "api_fault", b"\x00" + api[-1])
    write("firecracker_api", "api_chunked", b"\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"id\"\r\n0\r\n\r\n")
    sample = b'{"utc_timestamp_ms":1,"block":{"read_bytes":512,"write_bytes":4096,"read_count":1,"write_count":2},"net":{"rx_bytes_count":60,"tx_bytes_count":70,"rx_packets_count":1,"tx_packets_count":1},"vcpu":{"exit_io_in":3,"exit_io_out":4,"exit_mmio_read":5,"exit_mmio_write":6,"failures":0}}\n'
    write("firecracker_metrics", "flushes", sample + sample + b'{"block":{}}\nnot json\n' + sample[:40])
    # Regression inputs: each crashed a target before its fix.
    huge = b'{"block":{"read_bytes":18446744073709551615},"vcpu":{"exit_io_in":18446744073709551615,"exit_io_out":1}}\n'
    write("firecracker_metrics", "crash_counter_overflow", huge + huge)
    write("firecracker_api", "vsock_ok", b"\x01OK 1073741824\n\x00\x00\x00\x09NOVA")
    write("firecracker_api", "vsock_garbage", b"\x01HTTP/1.1 400\n")

    # Configs and request bodies.
    write("sandbox_config", "full", b'{"template_id":"python","memory_mb":512,"vcpus":2,"boot_timeout_ms":30000,"kernel_args":"quiet","enable_network":true,"host_port":8080,"guest_port":80,"rootfs_path":"/srv/r.ext4","extra_drives":[{"path":"/srv/d.ext4","read_only":true}],"labels":{"app":"web","team.io/name":"x"},"read_only_rootfs":false,"env":{"A":"1"},"start":"auto"}')
    write("sandbox_config", "empty", b"{}")
    write("sandbox_config", "small", b'{"template_id":"minimal","memory_mb":128,"vcpus":1,"start":"cold"}')
    write("server_requests", "create_full", b'\x00{"template":"python","memory_mb":512,"vcpus":2,"network":true,"ports":[{"host_port":8080,"guest_port":80}],"labels":{"app":"web"},"env":{"A":"1"},"timeout_secs":60,"volumes":[{"name":"data","read_only":true}],"start":"snapshot"}')
    write("server_requests", "create_empty", b"\x00{}")
    write("server_requests", "exec_cmd", b'\x01{"cmd":["ls","-l"],"env":{"B":"2"},"cwd":"/tmp","stdin":"hi","timeout_ms":1000,"max_output_bytes":4096,"tty":{"rows":24,"cols":80},"interactive":false}')
    write("server_requests", "exec_shell", b'\x01{"shell":"echo hi"}')
    write("policy_toml", "documented", b"""[limits]
max_memory_mb = 4096
max_vcpus = 4
max_sandboxes = 100
max_total_memory_mb = 65536
max_total_vcpus = 256
default_timeout_secs = 300
max_timeout_secs = 86400
max_pending_creates = 64
max_concurrent_creates = 8
max_upload_bytes = 1073741824
boot_timeout_ms = 30000

[templates]
allowed = []
default = "python"

[network]
default = true
allowed = true

[volumes.data]
path = "/srv/nova/data.ext4"
read_only = true

[pool]
python = 2
""")
    write("policy_toml", "empty", b"")
    m = b"9223372036854775807"
    write("policy_toml", "crash_pool_sum_overflow", b"[limits]\nmax_sandboxes = " + m + b"\n[pool]\na = " + m + b"\nb = " + m + b"\nc = " + m + b"\n")
    write("policy_toml", "strict", b'[limits]\nmax_memory_mb = 256\nmax_vcpus = 1\n[templates]\nallowed = ["minimal"]\ndefault = "minimal"\n[network]\ndefault = false\nallowed = false\n')

    # oci_layer: small layers, benign and hostile (raw headers, so that
    # `..` and absolute names survive).
    write("oci_layer", "files_links_whiteouts", tar_bytes([
        ("etc/", "5", "", b""),
        ("etc/passwd", "0", "", b"root:x:0:0::/root:/bin/sh\n"),
        ("lib", "2", "usr/lib", b""),
        ("lib/libx.so", "0", "", b"x"),
        ("etc/hardlink", "1", "etc/passwd", b""),
        ("etc/.wh.passwd", "0", "", b""),
        ("etc/.wh..wh..opq", "0", "", b""),
    ]))
    write("oci_layer", "traversal", tar_bytes([("../canary/pwned", "0", "", b"x")]))
    write("oci_layer", "absolute", tar_bytes([("/canary/pwned", "0", "", b"x")]))
    write("oci_layer", "symlink_escape", tar_bytes([
        ("esc", "2", "../canary", b""),
        ("esc/pwned", "0", "", b"x"),
    ]))
    write("oci_layer", "whiteout_dotdot", tar_bytes([("etc/.wh...", "0", "", b"")]))
    write("oci_layer", "gzip", gzip.compress(tar_bytes([("f", "0", "", b"gz")])))


def tar_bytes(entries):
    """A ustar stream of (name, typeflag, linkname, data), names raw."""
    out = b""
    for name, kind, link, data in entries:
        header = bytearray(512)
        header[0:len(name)] = name.encode()
        header[100:108] = b"0000644\0"
        header[108:116] = b"0000000\0"
        header[116:124] = b"0000000\0"
        header[124:136] = ("%011o" % len(data)).encode() + b"\0"
        header[136:148] = b"00000000000\0"
        header[156:157] = kind.encode()
        header[157:157 + len(link)] = link.encode()
        header[257:263] = b"ustar\0"
        header[263:265] = b"00"
        header[148:156] = b" " * 8
        header[148:156] = ("%06o" % sum(header)).encode() + b"\0 "
        out += bytes(header) + data + b"\0" * ((512 - len(data) % 512) % 512)
    return out + b"\0" * 1024


if __name__ == "__main__":
    main()
