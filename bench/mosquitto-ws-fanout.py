#!/usr/bin/env python3
"""Mosquitto MQTT-over-WebSocket fan-out CPU reference benchmark.

N subscribers (split over W worker processes) subscribe over ws://host:port
(subprotocol "mqtt") to one topic; one publisher (main process, also over WS)
publishes R msgs/s, 64-byte payload, QoS 0, for warm-up + D seconds.
Payload = seq (u64) + CLOCK_MONOTONIC send ns (u64) + padding.

Reports published/expected/received/lost deliveries for the measured window,
end-to-end latency percentiles, mosquitto utime+stime over the measured window
(/proc/PID/stat) -> µs CPU per delivery, and the harness' own CPU.

Minimal hand-written WebSocket (RFC 6455) + MQTT 3.1.1 client on asyncio
Protocols (uvloop if available).
"""
import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD_LEN = 64
TS = struct.Struct(">QQ")


def proc_cpu(pid):
    """utime+stime (seconds) of a process from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def enc_varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mqtt_str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def mqtt_connect(client_id, keepalive):
    vh = mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack(">H", keepalive)
    body = vh + mqtt_str(client_id)
    return b"\x10" + enc_varint(len(body)) + body


def mqtt_subscribe(topic, pid=1):
    body = struct.pack(">H", pid) + mqtt_str(topic) + b"\x00"
    return b"\x82" + enc_varint(len(body)) + body


def mqtt_publish_hdr(topic, plen):
    vh = mqtt_str(topic)
    return b"\x30" + enc_varint(len(vh) + plen) + vh


PINGREQ = b"\xc0\x00"


def ws_frame(payload, opcode=2):
    """Client->server frame (must be masked)."""
    n = len(payload)
    if n < 126:
        hdr = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        hdr = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
    else:
        hdr = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
    key = os.urandom(4)
    if n:
        k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")
    else:
        masked = b""
    return hdr + key + masked


class WsMqttClient(asyncio.Protocol):
    """One WebSocket MQTT connection. on_publish(seq, ts_ns, now_ns)."""

    def __init__(self, host, port, path, client_id, keepalive, on_publish=None):
        self.host, self.port, self.path = host, port, path
        self.client_id, self.keepalive = client_id, keepalive
        self.on_publish = on_publish
        self.transport = None
        self.state = "http"
        self.hbuf = b""
        self.wbuf = b""     # websocket frame buffer
        self.mbuf = b""     # mqtt stream buffer
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        self.suback = loop.create_future()
        self.handshake = loop.create_future()
        self.closed = loop.create_future()

    # --- asyncio protocol ---
    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Protocol: mqtt\r\n\r\n")
        transport.write(req.encode())

    def connection_lost(self, exc):
        for f in (self.handshake, self.connack, self.suback):
            if not f.done():
                f.set_exception(ConnectionError(f"lost: {exc}"))
                f.exception()  # mark retrieved (nobody may be awaiting it)
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data):
        if self.state == "http":
            self.hbuf += data
            i = self.hbuf.find(b"\r\n\r\n")
            if i < 0:
                return
            head, data = self.hbuf[:i], self.hbuf[i + 4:]
            self.hbuf = b""
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.handshake.set_exception(ConnectionError(head[:200]))
                self.transport.close()
                return
            self.state = "ws"
            self.handshake.set_result(True)
            if not data:
                return
        buf = self.wbuf + data if self.wbuf else data
        n = len(buf)
        i = 0
        while n - i >= 2:
            b1 = buf[i + 1] & 0x7F
            if b1 < 126:
                hl = 2
                ln = b1
            elif b1 == 126:
                if n - i < 4:
                    break
                hl = 4
                ln = (buf[i + 2] << 8) | buf[i + 3]
            else:
                if n - i < 10:
                    break
                hl = 10
                ln = int.from_bytes(buf[i + 2:i + 10], "big")
            end = i + hl + ln
            if end > n:
                break
            op = buf[i] & 0x0F
            if op == 2 or op == 0 or op == 1:
                self.mqtt_data(buf[i + hl:end])
            elif op == 9:  # ping -> pong
                self.transport.write(ws_frame(buf[i + hl:end], 0xA))
            elif op == 8:
                self.transport.close()
            i = end
        self.wbuf = buf[i:] if i < n else b""

    # --- MQTT stream ---
    def mqtt_data(self, chunk):
        buf = self.mbuf + chunk if self.mbuf else chunk
        n = len(buf)
        i = 0
        while n - i >= 2:
            # remaining length varint
            rl = 0
            mult = 1
            j = i + 1
            while True:
                if j >= n:
                    self.mbuf = buf[i:]
                    return
                b = buf[j]
                rl += (b & 0x7F) * mult
                j += 1
                if not b & 0x80:
                    break
                mult <<= 7
            end = j + rl
            if end > n:
                break
            t = buf[i] & 0xF0
            if t == 0x30:
                tl = (buf[j] << 8) | buf[j + 1]
                p = j + 2 + tl
                if buf[i] & 0x06:
                    p += 2
                seq, ts = TS.unpack_from(buf, p)
                self.on_publish(seq, ts)
            elif t == 0x20:
                if buf[j + 1] != 0:
                    self.connack.set_exception(ConnectionError(f"CONNACK rc={buf[j+1]}"))
                elif not self.connack.done():
                    self.connack.set_result(True)
            elif t == 0x90:
                if not self.suback.done():
                    self.suback.set_result(buf[j + 2:end])
            # 0xD0 PINGRESP ignored
            i = end
        self.mbuf = buf[i:] if i < n else b""

    def send_mqtt(self, pkt):
        self.transport.write(ws_frame(pkt))


async def open_client(host, port, path, client_id, keepalive, on_publish, topic=None):
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: WsMqttClient(host, port, path, client_id, keepalive, on_publish), host, port)
    await asyncio.wait_for(proto.handshake, 20)
    proto.send_mqtt(mqtt_connect(client_id, keepalive))
    await asyncio.wait_for(proto.connack, 20)
    if topic is not None:
        proto.send_mqtt(mqtt_subscribe(topic))
        rc = await asyncio.wait_for(proto.suback, 20)
        if rc[:1] == b"\x80":
            raise ConnectionError("SUBACK failure")
    return proto


async def pinger(clients, keepalive):
    """Send PINGREQ to every client about every keepalive/2 s, spread out."""
    if not clients:
        return
    period = keepalive / 2.0
    while True:
        step = period / len(clients)
        for c in clients:
            await asyncio.sleep(step)
            if not c.transport.is_closing():
                c.send_mqtt(PINGREQ)


# ---------------------------------------------------------------- worker
def worker_main(wid, nsubs, args, m_first, m_last, conn):
    if uvloop:
        uvloop.install()
    asyncio.run(worker_async(wid, nsubs, args, m_first, m_last, conn))


async def worker_async(wid, nsubs, args, m_first, m_last, conn):
    loop = asyncio.get_running_loop()
    lat = array("q")
    st = {"recv": 0, "other": 0}
    lat_append = lat.append
    mono = time.monotonic_ns

    def on_publish(seq, ts):
        if m_first <= seq <= m_last:
            st["recv"] += 1
            lat_append(mono() - ts)
        else:
            st["other"] += 1

    sem = asyncio.Semaphore(args.connect_concurrency)

    async def one(i):
        async with sem:
            return await open_client(args.host, args.port, args.path,
                                     f"fan-{os.getpid()}-{wid}-{i}", args.keepalive,
                                     on_publish, args.topic)

    try:
        clients = await asyncio.gather(*(one(i) for i in range(nsubs)))
    except Exception as e:  # report failure
        conn.send(("error", repr(e)))
        return
    ping_task = loop.create_task(pinger(clients, args.keepalive))
    conn.send(("ready", nsubs))

    # wait for commands from main
    q = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: q.put_nowait(conn.recv()))
    while True:
        cmd = await q.get()
        if cmd[0] == "drain":
            expected = cmd[1] * nsubs
            deadline = time.monotonic() + cmd[2]
            while st["recv"] < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            lost_conn = sum(1 for c in clients if c.closed.done())
            # the pipe fd was made non-blocking by add_reader; restore before a big send
            loop.remove_reader(conn.fileno())
            os.set_blocking(conn.fileno(), True)
            conn.send(("stats", st["recv"], st["other"], lost_conn, lat.tobytes()))
            conn.recv()  # wait for "quit" (blocking; nothing else to do)
            break
    ping_task.cancel()
    for c in clients:
        c.transport.close()
    await asyncio.sleep(0.2)


# ---------------------------------------------------------------- main
def start_broker(args):
    conf = os.path.abspath(args.conf)
    log = open(os.path.join(tempfile.gettempdir(), "mosquitto-ws-fanout.log"), "w")

    def pre():
        import resource
        h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
        os.setsid()

    p = subprocess.Popen([args.mosquitto, "-c", conf], stdout=log, stderr=subprocess.STDOUT,
                         preexec_fn=pre)
    # wait for the websocket port
    import socket
    for _ in range(100):
        if p.poll() is not None:
            raise SystemExit(f"mosquitto exited rc={p.returncode}; see log")
        try:
            socket.create_connection((args.host, args.port), 0.2).close()
            return p
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise SystemExit("mosquitto websocket port not reachable")


def pct(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


async def publisher(args, m_first, m_last, broker_pid, worker_pids, on_window):
    pub = await open_client(args.host, args.port, args.path, f"fan-pub-{os.getpid()}",
                            args.keepalive, lambda s, t: None)
    hdr = mqtt_publish_hdr(args.topic, PAYLOAD_LEN)
    pad = b"\x00" * (PAYLOAD_LEN - TS.size)
    mono = time.monotonic_ns
    interval = 1e9 / args.rate
    total = m_last + 1
    t0 = mono() + 50_000_000
    ping_deadline = time.monotonic() + args.keepalive / 2
    for seq in range(total):
        target = t0 + int(seq * interval)
        now = mono()
        if target > now:
            await asyncio.sleep((target - now) / 1e9)
        if seq == m_first:
            on_window("start")
        ts = mono()
        pub.send_mqtt(hdr + TS.pack(seq, ts) + pad)
        if time.monotonic() > ping_deadline:
            pub.send_mqtt(PINGREQ)
            ping_deadline = time.monotonic() + args.keepalive / 2
    # window ends one interval after the last measured publish
    end_target = t0 + int(total * interval)
    now = mono()
    if end_target > now:
        await asyncio.sleep((end_target - now) / 1e9)
    on_window("end")
    return pub


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--subs", type=int, default=1000)
    ap.add_argument("-r", "--rate", type=float, default=20.0, help="publishes per second")
    ap.add_argument("-d", "--duration", type=float, default=30.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("-w", "--workers", type=int, default=2, help="subscriber processes")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001)
    ap.add_argument("--path", default="/mqtt")
    ap.add_argument("--topic", default="bench/fanout")
    ap.add_argument("--keepalive", type=int, default=60)
    ap.add_argument("--connect-concurrency", type=int, default=50)
    ap.add_argument("--drain-timeout", type=float, default=5.0)
    ap.add_argument("--idle-sample", type=float, default=2.0,
                    help="seconds to sample broker idle CPU before warm-up")
    ap.add_argument("--conf", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mosquitto.conf"))
    ap.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    ap.add_argument("--broker-pid", type=int, default=0,
                    help="use an already running broker with this PID instead of starting one")
    args = ap.parse_args()

    m_first = int(round(args.warmup * args.rate))
    n_meas = int(round(args.duration * args.rate))
    m_last = m_first + n_meas - 1

    broker = None
    if args.broker_pid:
        broker_pid = args.broker_pid
    else:
        broker = start_broker(args)
        broker_pid = broker.pid
    print(f"broker pid {broker_pid}; {args.subs} subs over {args.workers} workers, "
          f"{args.rate} msg/s, warm-up {args.warmup}s ({m_first} msgs), measured {args.duration}s ({n_meas} msgs)",
          flush=True)

    ctx = mp.get_context("fork")
    procs, pipes = [], []
    try:
        share = [args.subs // args.workers + (1 if i < args.subs % args.workers else 0)
                 for i in range(args.workers)]
        t_conn = time.monotonic()
        for wid, ns in enumerate(share):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(wid, ns, args, m_first, m_last, b), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(a)
        for a in pipes:
            msg = a.recv()
            if msg[0] != "ready":
                raise SystemExit(f"worker failed: {msg}")
        print(f"all {args.subs} subscribers connected+subscribed in {time.monotonic()-t_conn:.1f}s", flush=True)

        time.sleep(0.5)
        c0 = proc_cpu(broker_pid)
        t_idle = time.monotonic()
        time.sleep(args.idle_sample)
        idle_rate = (proc_cpu(broker_pid) - c0) / (time.monotonic() - t_idle)

        harness_pids = [p.pid for p in procs] + [os.getpid()]
        samples = {}

        def on_window(which):
            samples[which] = (time.monotonic(), proc_cpu(broker_pid),
                              [proc_cpu(pid) for pid in harness_pids])

        if uvloop:
            uvloop.install()

        async def run_pub():
            pub = await publisher(args, m_first, m_last, broker_pid, harness_pids, on_window)
            return pub

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        pub = loop.run_until_complete(run_pub())
        # drain: wait for in-flight deliveries, then sample again
        for a in pipes:
            a.send(("drain", n_meas, args.drain_timeout))
        results = [a.recv() for a in pipes]
        on_window("drained")
        pub.transport.close()
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()
        for a in pipes:
            a.send(("quit",))
        for p in procs:
            p.join(5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if broker is not None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(5)
            except subprocess.TimeoutExpired:
                broker.kill()

    received = sum(r[1] for r in results)
    other = sum(r[2] for r in results)
    closed = sum(r[3] for r in results)
    lat = array("q")
    for r in results:
        lat.frombytes(r[4])
    lat = sorted(lat)
    expected = n_meas * args.subs
    ts_, cb_s, ch_s = samples["start"]
    te, cb_e, ch_e = samples["end"]
    td, cb_d, ch_d = samples["drained"]
    win = te - ts_
    bcpu_end = cb_e - cb_s
    bcpu_drained = cb_d - cb_s
    harness = [e - s for s, e in zip(ch_s, ch_e)]
    us = lambda ns: ns / 1000.0
    print("---- results ----")
    print(f"messages published (measured window): {n_meas}   (+{m_first} warm-up)")
    print(f"deliveries expected:  {expected}")
    print(f"deliveries received:  {received}")
    print(f"lost:                 {expected - received}   (outside-window/warm-up deliveries seen: {other}; closed conns: {closed})")
    print(f"latency us: p50 {us(pct(lat,50)):.0f}  p90 {us(pct(lat,90)):.0f}  p99 {us(pct(lat,99)):.0f}  "
          f"max {us(lat[-1]) if lat else float('nan'):.0f}")
    print(f"measured window: {win:.2f}s  (drain took extra {td-te:.2f}s)")
    print(f"mosquitto CPU over window: {bcpu_end:.2f}s ({100*bcpu_end/win:.1f}% of a core); "
          f"incl. drain: {bcpu_drained:.2f}s; idle rate before: {100*idle_rate:.2f}%")
    if received:
        print(f"mosquitto CPU per delivery: {1e6*bcpu_end/received:.2f} us "
              f"(incl. drain: {1e6*bcpu_drained/received:.2f} us; "
              f"minus idle-rate baseline: {1e6*(bcpu_end-idle_rate*win)/received:.2f} us)")
    print("harness CPU over window: " + ", ".join(
        f"{'worker'+str(i) if i < len(procs) else 'main/pub'} {h:.2f}s ({100*h/win:.0f}%)"
        for i, h in enumerate(harness)) + f"; total {sum(harness):.2f}s ({100*sum(harness)/win:.0f}% of a core)")
    print(f"clock resolution CLK_TCK={CLK_TCK} (CPU samples quantised to {1000/CLK_TCK:.0f} ms)")


if __name__ == "__main__":
    main()
