#!/usr/bin/env python3
"""A fault-injection run with a checker (issue 13), Jepsen-style, on the real stack.

Three cluster nodes on Cassandra, Kafka and ZooKeeper (scripts/stack). Producers append over HTTP
(`?wait=true`, so each answer is an acknowledgement with a version) and straight into Kafka with
Kafka's console producer, every message with an id. python-socketio clients on every node ack,
disconnect and resume, often on another node; bindings change all the time. Meanwhile a seeded
random schedule of faults: SIGKILL and SIGSTOP/SIGCONT of nodes, restarts of Cassandra, Kafka
and ZooKeeper, a rolling restart, and network faults (latency, cut, blackhole) in fault-injecting
TCP proxies between the nodes and between each node and ZooKeeper.

Then everything heals and the checker verifies, over every operation:
- each mailbox's versions are 1..head with no gap, and no id is in a mailbox twice;
- each acknowledged message is in its mailbox exactly once, at the acknowledged version (HTTP),
  or exactly once (Kafka, where the producer's ack carries no version);
- nothing is in a mailbox that no producer sent;
- each client received, per address, versions in increasing order with no repeat, consecutive
  from the cursor it resumed with (or from a `bound`/`gap`), and each one it received is the
  message the mailbox holds at that version (nothing delivered that was never appended);
- at the end each client has received every version of its addresses up to the head;
- each binding acknowledged is in force unless an acknowledged unbind followed.

Work addresses: workers (python-socketio clients bound to two `work:` addresses with weights)
ack what they are dealt, or keep it until their connection ends, and move between nodes; the
checker verifies that every work message is done in the end, that no message was held by two
connections at once (unless a fault took the first holder's node, or ZooKeeper, out meanwhile),
that a done message is not dealt again (unless a fault came between), and that each message
dealt is the one the mailbox holds.

Usage: tests/chaos/chaos.py [--seed N] [--seconds S] [--messages M] [--faults F] [--workers W]
[--out DIR]
(scripts/chaos wraps it: it brings the stack up first). Exit status 0 only if every check held.
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import socketio

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("SIGNALPOST_BIN", os.path.join(ROOT, "target", "release", "signalpost"))
STACK = os.path.join(ROOT, "scripts", "stack")
NODES = 3
CHANNELS = [f"channel:c{i}" for i in range(8)]
# Work addresses: each message goes to one worker at a time (see Worker and Checker.check_work).
WORKS = ["work:w0", "work:w1"]
# The node's default work_ack_timeout_ms: no worker holds a message this long, so a message is
# only dealt again when its holder's connection ends (or a fault takes its node out).
WORK_ACK_TIMEOUT = 30.0
# After a fault heals, how long its effects may last: a paused node finding its ZooKeeper
# session gone, members leaving (the runs' sessions time out in 4 s), acks forwarded late.
FAULT_AFTERMATH = 10.0
T0 = time.time()


def now():
    return round(time.time() - T0, 3)


def log(*a):
    print(f"[{now():8.2f}]", *a, flush=True)


def http(url, method, path, body=None, timeout=15):
    """(status, body) — status 0 when the node did not answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (OSError, ValueError):
        return 0, None


# ---------------------------------------------------------------------------------------------
# A fault-injecting TCP proxy: pass, latency, cut (close every connection), blackhole (keep the
# connections, forward nothing).


class Proxy:
    def __init__(self, name, port, target_port):
        self.name, self.port, self.target = name, port, target_port
        self.mode, self.latency = "pass", 0.0
        self.conns = set()

    async def start(self):
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", self.port)

    async def accept(self, reader, writer):
        if self.mode in ("cut", "blackhole"):
            if self.mode == "cut":
                writer.close()
                return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, uw)
        self.conns.add(pair)
        await asyncio.gather(self.pipe(reader, uw), self.pipe(ur, writer), return_exceptions=True)
        self.conns.discard(pair)
        for w in pair:
            w.close()

    async def pipe(self, reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.mode == "blackhole":
                    continue
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def set(self, mode, latency=0.0):
        self.mode, self.latency = mode, latency
        if mode == "cut":
            for a, b in list(self.conns):
                a.close()
                b.close()


class Proxies:
    """The proxies, on an event loop of their own in a thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.all = {}
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def add(self, name, port, target):
        p = Proxy(name, port, target)
        asyncio.run_coroutine_threadsafe(p.start(), self.loop).result()
        self.all[name] = p
        return p

    def set(self, name, mode, latency=0.0):
        self.loop.call_soon_threadsafe(self.all[name].set, mode, latency)


# ---------------------------------------------------------------------------------------------
# The nodes.


class Node:
    def __init__(self, i, run, env):
        self.i = i
        self.port = 18100 + i
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = os.path.join(run, f"node-{i}")
        os.makedirs(self.dir, exist_ok=True)
        self.env = env
        self.proc = None

    def start(self):
        # A port another process listens on would let that process answer for this node (its
        # /healthz, its API) while this one fails to bind: say so instead.
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", self.port))
        except OSError as e:
            raise RuntimeError(f"node {self.i}: port {self.port} is taken by another process ({e})")
        finally:
            probe.close()
        logf = open(os.path.join(self.dir, "node.log"), "a")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--backend", "cluster", "--listen", f"127.0.0.1:{self.port}",
             "--data-dir", self.dir],
            stdout=logf, stderr=logf, env={**os.environ, "RUST_LOG": "warn", **self.env})

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ready(self, within=120):
        end = time.time() + within
        while time.time() < end:
            if not self.alive():
                return False
            if http(self.url, "GET", "/healthz", timeout=2)[0] == 200:
                return True
            time.sleep(0.3)
        return False

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, within=40):
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# What was done, for the checker.


class History:
    def __init__(self):
        self.lock = threading.RLock()
        self.sent = {}        # id -> address (every id any producer sent)
        self.acked = {}       # id -> (address, version or None)
        self.bind_ops = []    # (client, address, bind?, outcome: "ok" | "unknown")
        self.faults = []      # {kind, target, start, end}
        self.throughput = []  # (t, messages acknowledged in that second)
        self.violations = []
        self.counts = {"http_batches": 0, "http_failed": 0, "kafka_batches": 0, "kafka_failed": 0,
                       "resumes": 0, "signals": 0, "work_connections": 0, "work_acks_refused": 0}
        self.deliveries = []  # every work message dealt to a worker (Worker.on_signal)
        self.conn_closed = {}  # a worker's connection number -> when it ended

    def violation(self, what):
        with self.lock:
            if len(self.violations) < 200:
                self.violations.append(f"[{now()}] {what}")
        log("VIOLATION", what)


class Run:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.h = History()
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set when faults are over and producers stop
        tag = f"{args.seed}x{secrets.token_hex(2)}"
        self.tag = tag
        self.run_dir = os.path.join(args.out, f"run-{tag}")
        os.makedirs(self.run_dir, exist_ok=True)
        self.proxies = Proxies()
        self.nodes = []
        resume = secrets.token_hex(32)
        cluster = secrets.token_hex(32)
        for i in range(1, NODES + 1):
            peer = self.proxies.add(f"peer-{i}", 18200 + i, 18100 + i)
            zk = self.proxies.add(f"zk-{i}", 18300 + i, 2181)
            env = {
                "SIGNALPOST_CASSANDRA_KEYSPACE": f"chaos_{tag}",
                "SIGNALPOST_KAFKA_TOPIC_PREFIX": f"chaos-{tag}.",
                "SIGNALPOST_KAFKA_GROUP": f"chaos-{tag}",
                "SIGNALPOST_KAFKA_PARTITIONS": "4",
                "SIGNALPOST_ZOOKEEPER": f"127.0.0.1:{zk.port}",
                "SIGNALPOST_ZOOKEEPER_ROOT": f"/chaos-{tag}",
                "SIGNALPOST_ZOOKEEPER_SESSION_TIMEOUT_MS": "4000",
                "SIGNALPOST_ADVERTISE_URL": f"http://127.0.0.1:{peer.port}",
                "SIGNALPOST_CLUSTER_SECRET": cluster,
                "SIGNALPOST_RESUME_SECRET": resume,
                "SIGNALPOST_CONNECT_RATE_PER_IP": "0",
            }
            self.nodes.append(Node(i, self.run_dir, env))
        self.msg_seq = 0
        self.clients = []
        self.workers = []
        self.finished = threading.Event()  # set when the checker is done with the workers

    def live_urls(self):
        urls = [n.url for n in self.nodes if n.alive()]
        return urls or [self.nodes[0].url]

    # -- producers ------------------------------------------------------------------------

    def addresses(self):
        own = [f"client:{c.client_id}" for c in self.clients if c.client_id]
        return CHANNELS + own + (WORKS if self.workers else [])

    def next_ids(self, prefix, n):
        with self.h.lock:
            start = self.msg_seq
            self.msg_seq += n
        return [f"{prefix}-{start + k}" for k in range(n)]

    def http_producer(self, k):
        rng = random.Random(self.args.seed * 100 + k)
        while not self.quiet.is_set() and self.h_acked_total() < self.args.messages:
            addrs = self.addresses()
            n = rng.randint(1, 100)
            batch = [{"address": rng.choice(addrs), "id": i, "payload": {"i": i, "p": k}}
                     for i in self.next_ids(f"h{k}", n)]
            with self.h.lock:
                for m in batch:
                    self.h.sent[m["id"]] = m["address"]
            for _attempt in range(4):  # a real producer retries with the same ids
                url = rng.choice(self.live_urls())
                status, body = http(url, "POST", "/server/enqueue?wait=true", batch, timeout=20)
                self.h.counts["http_batches"] += 1
                if status == 200:
                    with self.h.lock:
                        for m, r in zip(batch, body["results"]):
                            if r.get("version") is None:
                                self.h.violation(f"an acknowledged append without a version: {r}")
                            self.h.acked[m["id"]] = (m["address"], r.get("version"))
                    self.tick(len(batch))
                    break
                self.h.counts["http_failed"] += 1
                time.sleep(0.5)

    def kafka_producer(self):
        rng = random.Random(self.args.seed * 100 + 99)
        topic = f"chaos-{self.tag}.enqueue"
        while not self.quiet.wait(rng.uniform(4, 8)):
            addrs = self.addresses()
            batch = [{"address": rng.choice(addrs), "id": i, "payload": {"i": i, "p": "k"}}
                     for i in self.next_ids("k", 100)]
            with self.h.lock:
                for m in batch:
                    self.h.sent[m["id"]] = m["address"]
            lines = "".join(f"{m['address']}\t{json.dumps(m)}\n" for m in batch)
            try:
                r = subprocess.run([STACK, "produce", topic], input=lines, text=True,
                                   capture_output=True, timeout=60)
                ok = r.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            self.h.counts["kafka_batches"] += 1
            if ok:
                with self.h.lock:
                    for m in batch:
                        self.h.acked[m["id"]] = (m["address"], None)
                self.tick(len(batch))
            else:
                self.h.counts["kafka_failed"] += 1

    def h_acked_total(self):
        return len(self.h.acked)

    def tick(self, n):
        with self.h.lock:
            sec = int(now())
            if self.h.throughput and self.h.throughput[-1][0] == sec:
                self.h.throughput[-1] = (sec, self.h.throughput[-1][1] + n)
            else:
                self.h.throughput.append((sec, n))

    # -- bindings -------------------------------------------------------------------------

    def binder(self):
        rng = random.Random(self.args.seed * 100 + 77)
        while not self.quiet.wait(rng.uniform(0.3, 1.2)):
            ready = [c for c in self.clients if c.client_id]
            if not ready:
                continue
            c = rng.choice(ready)
            a = rng.choice(CHANNELS)
            bind = rng.random() < 0.6
            status, _ = http(rng.choice(self.live_urls()),
                             "POST", "/server/connect" if bind else "/server/disconnect",
                             {"client": c.client_id, "addresses": [a]}, timeout=15)
            with self.h.lock:
                self.h.bind_ops.append((c.client_id, a, bind, "ok" if status == 200 else "unknown"))

    # -- faults ---------------------------------------------------------------------------

    def fault(self, kind, target, action, heal=None, hold=0.0):
        start = now()
        log(f"fault {kind} {target}")
        action()
        if hold:
            time.sleep(hold)
        if heal:
            heal()
        self.h.faults.append({"kind": kind, "target": target, "start": start, "end": now()})

    def restart_node(self, n):
        n.start()
        if not n.ready(120):
            self.h.violation(f"node {n.i} did not become ready after a restart")

    def stack(self, *args):
        r = subprocess.run([STACK, *args], capture_output=True, text=True, timeout=400,
                           env={**os.environ, "SIGNALPOST_BIN": BIN})
        if r.returncode != 0:
            log(f"scripts/stack {' '.join(args)} failed: {r.stderr[-500:]}")

    def stack_pid(self, server):
        try:
            with open(os.path.join(os.environ.get("SIGNALPOST_STACK_DIR", os.path.join(ROOT, ".stack")),
                                   "run", f"{server}.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            log(f"no pid for {server}")
            return None

    def one_fault(self, rng):
        n = rng.choice(self.nodes)
        kinds = ["kill", "pause", "peer-net", "zk-net", "peer-net", "kill", "pause",
                 "restart-kafka", "restart-zookeeper", "restart-cassandra", "rolling",
                 "freeze-kafka", "freeze-cassandra", "freeze-zookeeper"]
        kind = rng.choice(kinds)
        if kind == "kill":
            self.fault("SIGKILL node", n.i, lambda: n.signal(signal.SIGKILL),
                       lambda: (n.proc.wait(), self.restart_node(n)), rng.uniform(1, 5))
        elif kind == "pause":
            self.fault("SIGSTOP node", n.i, lambda: n.signal(signal.SIGSTOP),
                       lambda: n.signal(signal.SIGCONT), rng.uniform(2, 8))
        elif kind in ("peer-net", "zk-net"):
            name = f"{'peer' if kind == 'peer-net' else 'zk'}-{n.i}"
            mode = rng.choice(["latency", "cut", "blackhole"])
            lat = rng.uniform(0.1, 1.0) if mode == "latency" else 0.0
            label = f"{mode} {lat:.2f}s" if lat else mode
            self.fault(f"net {name} {label}", n.i, lambda: self.proxies.set(name, mode, lat),
                       lambda: self.proxies.set(name, "pass"), rng.uniform(3, 8))
        elif kind.startswith("restart-"):
            server = kind.split("-", 1)[1]
            self.fault(f"restart {server}", server, lambda: self.stack("down", server),
                       lambda: self.stack("up", server), rng.uniform(0, 3))
        elif kind.startswith("freeze-"):
            # SIGSTOP of a server: its connections stay open and nothing answers — a blackhole
            # between every node and it (their clients learn the servers' own addresses, so a
            # proxy could not stand in between).
            server = kind.split("-", 1)[1]
            pid = self.stack_pid(server)
            self.fault(f"SIGSTOP {server}", server, lambda: pid and os.kill(pid, signal.SIGSTOP),
                       lambda: pid and os.kill(pid, signal.SIGCONT), rng.uniform(2, 8))
        elif kind == "rolling":
            def roll():
                for m in self.nodes:
                    m.stop()
                    self.restart_node(m)
            self.fault("rolling restart", "all", roll)

    def faults(self):
        rng = random.Random(self.args.seed)
        for _ in range(self.args.faults):
            if self.stop.wait(rng.uniform(2, 6)):
                return
            self.one_fault(rng)

    # -- the run --------------------------------------------------------------------------

    def go(self):
        log(f"run {self.tag}: seed {self.args.seed}, {self.args.faults} faults, "
            f"{self.args.messages} messages at most, {self.args.seconds} s at most; {self.run_dir}")
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            if not n.ready(180):
                raise SystemExit(f"node {n.i} did not start; see {n.dir}/node.log")
        for k in range(self.args.clients):
            c = Client(self, k)
            self.clients.append(c)
            c.thread = threading.Thread(target=c.loop, daemon=True)
            c.thread.start()
        for k in range(self.args.workers):
            w = Worker(self, k)
            self.workers.append(w)
            w.thread = threading.Thread(target=w.loop, daemon=True)
            w.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline and not all(c.client_id for c in self.clients + self.workers):
            time.sleep(0.2)
        threads = [threading.Thread(target=self.http_producer, args=(k,), daemon=True)
                   for k in range(self.args.producers)]
        threads += [threading.Thread(target=self.kafka_producer, daemon=True),
                    threading.Thread(target=self.binder, daemon=True)]
        for t in threads:
            t.start()
        faults = threading.Thread(target=self.faults, daemon=True)
        faults.start()
        end = time.time() + self.args.seconds
        while time.time() < end and (faults.is_alive() or self.h_acked_total() < self.args.messages):
            time.sleep(0.5)
        self.stop.set()
        faults.join()
        self.quiet.set()
        for t in threads:
            t.join(90)
        log("faults over: healing")
        for name in self.proxies.all:
            self.proxies.set(name, "pass")
        for server in ("cassandra", "kafka", "zookeeper"):
            pid = self.stack_pid(server)
            if pid:
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        self.stack("up")
        for n in self.nodes:
            n.signal(signal.SIGCONT)
            if not n.alive():
                self.restart_node(n)
        for n in self.nodes:
            if not n.ready(120):
                self.h.violation(f"node {n.i} not ready after healing")
        return Checker(self).check()


def ordered_client():
    """A python-socketio client (no reconnection of its own) whose handlers run in the order the
    node sent: its threaded client hands each message to a thread of its own, so handlers could
    run out of order, and the checker needs the wire's order."""
    sio = socketio.Client(reconnection=False)
    trigger = sio.eio._trigger_event
    sio.eio._trigger_event = lambda event, *a, **kw: trigger(event, *a, **{**kw, "run_async": False})
    return sio


def take_session(c, who, s):
    """Keeps a `session` event's client id and resume token (a client or a worker, under its
    lock): a resume that comes back with another id is a violation."""
    if c.client_id and s["clientId"] != c.client_id:
        c.run.h.violation(f"{who}: resumed as {s['clientId']}")
    c.client_id = s["clientId"]
    c.token = s["resumeToken"]


class Client:
    """A python-socketio client that acks, disconnects and resumes, often on another node, and
    checks what it receives as it goes."""

    def __init__(self, run, k):
        self.run, self.k = run, k
        self.rng = random.Random(run.args.seed * 1000 + k)
        self.client_id = None
        self.token = None
        self.cursors = {}      # address -> last version received (given back at resume)
        self.got = {}          # (address, version) -> id
        self.expect = {}       # address -> next version expected, when it is known exactly
        self.bound = set()     # addresses of the current session
        self.synced = threading.Event()
        self.sio = None
        self.lock = threading.Lock()

    def on_signal(self, m):
        a, v = m["address"], m["version"]
        with self.lock:
            self.run.h.counts["signals"] += 1
            last = self.cursors.get(a, 0)
            if v <= last:
                self.run.h.violation(f"client {self.k}: {a} v{v} again or out of order (had v{last})")
                return
            exp = self.expect.get(a)
            if exp is not None and v != exp:
                self.run.h.violation(f"client {self.k}: {a} v{v} where v{exp} was next")
            if (a, v) in self.got and self.got[(a, v)] != m["id"]:
                self.run.h.violation(f"client {self.k}: {a} v{v} is two different messages")
            self.got[(a, v)] = m["id"]
            self.cursors[a] = v
            self.expect[a] = v + 1

    def on_bound(self, d):
        with self.lock:
            a = d["address"]
            self.bound.add(a)
            # Delivery starts after the head at binding (a position, as a cursor is).
            self.cursors[a] = max(d["version"], self.cursors.get(a, 0))
            self.expect[a] = self.cursors[a] + 1

    def on_unbound(self, d):
        with self.lock:
            self.bound.discard(d["address"])
            self.expect.pop(d["address"], None)

    def on_gap(self, d):
        with self.lock:
            self.cursors[d["address"]] = d["to"]
            self.expect[d["address"]] = d["to"] + 1

    def on_synced(self, d):
        with self.lock:
            # A binding made while it was away starts at the head then: its position now.
            for a, v in d["cursors"].items():
                if a not in self.cursors:
                    self.cursors[a] = v
                    self.expect[a] = v + 1
        self.synced.set()

    def on_session(self, s):
        with self.lock:
            take_session(self, f"client {self.k}", s)
            own = f"client:{self.client_id}"
            self.bound = set(s["addresses"]) | {own}
            # Exactly after the cursor it gave, for every address it gave one for; a binding
            # made while it was away starts wherever the binding put it.
            self.expect = {a: self.cursors[a] + 1 for a in self.bound if a in self.cursors}
            if own not in self.cursors:
                self.expect[own] = 1

    def connect(self):
        url = self.rng.choice(self.run.live_urls())
        sio = ordered_client()
        sio.on("signal", self.on_signal)
        sio.on("bound", self.on_bound)
        sio.on("unbound", self.on_unbound)
        sio.on("gap", self.on_gap)
        sio.on("session", self.on_session)
        sio.on("synced", self.on_synced)
        auth = {}
        if self.client_id:
            with self.lock:
                auth = {"clientId": self.client_id, "resumeToken": self.token,
                        "cursors": dict(self.cursors)}
            self.run.h.counts["resumes"] += 1
        self.synced.clear()
        sio.connect(url, auth=auth, transports=["websocket"], wait_timeout=10)
        self.sio = sio

    def loop(self):
        while not self.run.stop.is_set():
            try:
                self.connect()
            except Exception:
                time.sleep(0.5)
                continue
            stay = time.time() + self.rng.uniform(3, 20)
            while time.time() < stay and self.sio.connected and not self.run.stop.is_set():
                time.sleep(0.5)
                with self.lock:
                    acks = list(self.cursors.items())
                try:
                    for a, v in self.rng.sample(acks, min(3, len(acks))):
                        self.sio.emit("ack", {"address": a, "version": v})
                except Exception:
                    pass
            try:
                self.sio.disconnect()
            except Exception:
                pass
            self.run.stop.wait(self.rng.uniform(0, 2))

    def settle(self):
        """Connected once more after the faults, until `synced`."""
        self.thread.join(60)
        for _ in range(20):
            try:
                if self.sio:
                    self.sio.disconnect()
                self.connect()
                if self.synced.wait(60):
                    return True
            except Exception:
                time.sleep(1)
        return False


class Worker:
    """A python-socketio client bound to every work address with a weight of its own: it acks
    each message it is dealt after a short while, or now and then keeps one until its connection
    ends, and disconnects and resumes as the clients do. It records every delivery — which
    connection, on which node, when, and when it acked or disconnected — for the checker."""

    def __init__(self, run, k):
        self.run, self.k = run, k
        self.rng = random.Random(run.args.seed * 1000 + 500 + k)
        self.deal_rng = random.Random(run.args.seed * 1000 + 700 + k)  # the signal thread's
        self.weight = self.rng.randint(1, 3)
        self.client_id = None
        self.token = None
        self.bound = False
        self.sio = None
        self.conn = None         # the current connection's number (global, in connect order)
        self.node = None         # the current connection's node (index)
        self.held = {}           # (address, version) -> record, this connection's unacked
        self.due = []            # (time, record): acks to send
        self.acked_here = []     # records this connection acked
        self.closing = False     # the current connection is being closed
        self.lock = threading.Lock()
        self.synced = threading.Event()

    def on_session(self, s):
        with self.lock:
            take_session(self, f"worker {self.k}", s)

    def on_signal(self, m):
        if m["address"] not in WORKS:
            return
        t = time.time() - T0
        key = (m["address"], m["version"])
        with self.lock:
            rec = {"a": m["address"], "v": m["version"], "id": m["id"], "worker": self.k,
                   "conn": self.conn, "node": self.node, "recv": t, "ack": None, "end": None,
                   "refused": False}
            self.run.h.deliveries.append(rec)
            if self.closing:
                # Came in while this connection closes: held no longer than that.
                rec["end"] = t
                return
            # Dealt again to this same connection while it holds it: the checker's rule on two
            # holders at once judges it (with its excuses), as for two connections.
            self.held[key] = rec
            final = self.run.stop.is_set()
            if final or self.deal_rng.random() < 0.95:
                self.due.append((t + (0 if final else self.deal_rng.uniform(0, 0.5)), rec))
            # else: kept until this connection ends

    def on_error(self, e):
        text = (e or {}).get("message", "") if isinstance(e, dict) else str(e)
        with self.lock:
            self.run.h.counts["work_acks_refused"] += 1
            for rec in self.acked_here:
                if f"version {rec['v']} of {rec['a']} is not held" in text:
                    rec["refused"] = True

    def connect(self):
        i = self.rng.randrange(len(self.run.nodes))
        node = self.run.nodes[i]
        if not node.alive():
            node = next((n for n in self.run.nodes if n.alive()), node)
        sio = ordered_client()
        sio.on("signal", self.on_signal)
        sio.on("session", self.on_session)
        sio.on("synced", lambda d: self.synced.set())
        sio.on("error", self.on_error)
        auth = {"clientId": self.client_id, "resumeToken": self.token} if self.client_id else {}
        with self.lock:
            self.run.h.counts["work_connections"] += 1
            self.conn = self.run.h.counts["work_connections"]
            self.node = node.i
            self.held, self.due, self.acked_here = {}, [], []
            self.closing = False
        self.synced.clear()
        self.sio = sio
        sio.connect(node.url, auth=auth, transports=["websocket"], wait_timeout=10)
        self.bind(node)

    def bind(self, node):
        """Binds this worker to every work address once (the binding outlives its connections)."""
        if not self.bound and self.client_id and self.synced.wait(10):
            status, _ = http(node.url, "POST", "/server/connect?wait=true",
                             {"client": self.client_id, "addresses": WORKS,
                              "weight": self.weight})
            self.bound = status == 200

    def closed(self):
        """This connection is over: what it still holds is held no more, from now."""
        t = time.time() - T0
        with self.lock:
            self.run.h.conn_closed[self.conn] = t
            self.closing = True
            for rec in self.held.values():
                rec["end"] = t
            self.held, self.due = {}, []

    def send_due(self):
        t = time.time() - T0
        with self.lock:
            due = [r for at, r in self.due if at <= t]
            self.due = [(at, r) for at, r in self.due if at > t]
        for rec in due:
            try:
                self.sio.emit("ack", {"address": rec["a"], "version": rec["v"]})
            except Exception:
                return
            with self.lock:
                rec["ack"] = time.time() - T0
                self.held.pop((rec["a"], rec["v"]), None)
                self.acked_here.append(rec)

    def loop(self):
        while not self.run.finished.is_set():
            try:
                self.connect()
            except Exception:
                try:
                    self.sio.disconnect()
                except Exception:
                    pass
                self.closed()
                time.sleep(0.5)
                continue
            # Until the faults are over, stay 3-20 s; then stay until the checker is done.
            stay = time.time() + self.rng.uniform(3, 20)
            final = self.run.stop.is_set()
            node = self.run.nodes[self.node - 1]
            while (self.sio.connected and not self.run.finished.is_set()
                   and (final or (time.time() < stay and not self.run.stop.is_set()))):
                self.send_due()
                if not self.bound and self.rng.random() < 0.05:
                    self.bind(node)
                time.sleep(0.05)
            # Its end is when it is closed, before the node can learn of it and deal its
            # messages again (disconnect() returns after that), or when it was found closed.
            self.closed()
            try:
                self.sio.disconnect()
            except Exception:
                pass
            if not self.run.finished.is_set():
                self.run.finished.wait(self.rng.uniform(0, 1))


class Checker:
    def __init__(self, run):
        self.run = run
        self.h = run.h
        self.url = run.nodes[0].url

    def read_all(self, address):
        msgs, after = [], 0
        for _ in range(100000):
            status, body = http(self.url, "GET",
                                f"/server/mailbox/{urllib.request.quote(address, safe='')}"
                                f"?after={after}&limit=1000")
            if status != 200:
                raise RuntimeError(f"reading {address}: {status} {body}")
            msgs += body["messages"]
            if not body["messages"] or body["messages"][-1]["version"] >= body["head"]:
                return body["head"], msgs
            after = body["messages"][-1]["version"]

    def check(self):
        h = self.h
        log("settling the clients")
        for c in self.run.clients:
            if not c.settle():
                h.violation(f"client {c.k} could not connect and sync after the faults")
        # Kafka's acknowledgements come before the records are applied: wait until the
        # mailboxes stop changing and hold every acknowledged id, for 120 s at most.
        addresses = CHANNELS + [f"client:{c.client_id}" for c in self.run.clients if c.client_id]
        addresses += WORKS if self.run.workers else []
        deadline, heads = time.time() + 120, None
        while True:
            mailboxes = {a: self.read_all(a) for a in addresses}
            present = {m["id"] for _, msgs in mailboxes.values() for m in msgs}
            now_heads = {a: m[0] for a, m in mailboxes.items()}
            if (now_heads == heads and all(i in present for i in h.acked)) or time.time() > deadline:
                break
            heads = now_heads
            time.sleep(3)
        where = {}
        for a, (head, msgs) in mailboxes.items():
            versions = [m["version"] for m in msgs]
            if versions != list(range(1, head + 1)):
                h.violation(f"{a}: versions are not 1..{head} without gaps "
                            f"({len(versions)} messages)")
            for m in msgs:
                if m["id"] in where:
                    h.violation(f"id {m['id']} twice: {where[m['id']]} and {a} v{m['version']}")
                where[m["id"]] = (a, m["version"])
                if h.sent.get(m["id"]) != a:
                    h.violation(f"{a} v{m['version']}: id {m['id']} was never sent to it")
        lost = 0
        for i, (a, v) in h.acked.items():
            at = where.get(i)
            if at is None or at[0] != a or (v is not None and at[1] != v):
                lost += 1
                if lost <= 20:
                    h.violation(f"acknowledged {i} ({a} v{v}) is at {at}")
        # What each client received is what the mailbox holds; and it caught up to the heads.
        deadline = time.time() + 60
        for c in self.run.clients:
            for (a, v), i in list(c.got.items()):
                held = mailboxes.get(a, (0, []))[1]
                if v > len(held) or held[v - 1]["id"] != i:
                    h.violation(f"client {c.k} got {a} v{v} id {i}, not what the mailbox holds")
            status, info = http(self.url, "GET", f"/server/clients/{c.client_id}")
            addrs = set(info["addresses"] if status == 200 else []) | {f"client:{c.client_id}"}
            for a in addrs:
                head = self.read_all(a)[0]
                while c.cursors.get(a, 0) < head and time.time() < deadline:
                    time.sleep(0.2)
                if c.cursors.get(a, 0) < head:
                    h.violation(f"client {c.k}: {a} delivered up to v{c.cursors.get(a, 0)} of {head}")
            # Bindings: the last acknowledged operation per address holds, unless an operation
            # the other way has an unknown outcome (it may take effect at any time after it was
            # sent, even after a later acknowledged one).
            last, unknown = {}, set()
            for cid, a, bind, outcome in h.bind_ops:
                if cid != c.client_id:
                    continue
                if outcome == "ok":
                    last[a] = bind
                else:
                    unknown.add((a, bind))
            for a, bind in last.items():
                if (a, not bind) not in unknown and bind != (a in addrs):
                    h.violation(f"client {c.k}: {a} {'bound' if bind else 'unbound'} "
                                f"(acknowledged) but {'not ' if bind else ''}in force")
        self.check_work()
        total = sum(len(m[1]) for m in mailboxes.values())
        result = {
            "seed": self.run.args.seed, "tag": self.run.tag,
            "messages_in_mailboxes": total, "acknowledged": len(h.acked), "sent": len(h.sent),
            "lost": lost, "faults": len(h.faults), "violations": h.violations,
            "counts": h.counts, "bind_ops": len(h.bind_ops),
            "work_deliveries": len(h.deliveries), "workers": len(self.run.workers),
            "clients": len(self.run.clients), "fault_timeline": h.faults,
            "bindings": h.bind_ops,
            "throughput": h.throughput,
        }
        with open(os.path.join(self.run.run_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(self.run.run_dir, "chaos.svg"))
        log(f"{total} messages in {len(mailboxes)} mailboxes; {len(h.acked)} acknowledged "
            f"of {len(h.sent)} sent; {lost} lost; {len(h.faults)} faults; {h.counts}")
        log(f"result: {self.run.run_dir}/result.json, plot: {self.run.run_dir}/chaos.svg")
        return not h.violations

    def check_work(self):
        """Work addresses: every message done in the end, never held by two connections at once,
        never dealt again once done, and each one dealt is the one the mailbox holds."""
        h, run = self.h, self.run
        if not run.workers:
            return
        log("waiting for every work message to be done")
        deadline = time.time() + 150
        while True:
            mailboxes = {a: self.read_all(a)[1] for a in WORKS}
            left = [(a, m["version"], m.get("state")) for a, msgs in mailboxes.items()
                    for m in msgs if m.get("state") != "done"]
            if not left or time.time() > deadline:
                break
            time.sleep(2)
        for a, v, state in left[:20]:
            h.violation(f"{a} v{v} is {state}, not done, after the faults healed")
        run.finished.set()
        for w in run.workers:
            w.thread.join(30)

        def overlaps(f, lo, hi):
            return f["start"] <= hi and f["end"] + FAULT_AFTERMATH >= lo

        def node_fault(lo, hi, node):
            # Its node's death, pause or cut from the others or from ZooKeeper, or ZooKeeper's
            # own fault (every member may lose its session), lets the cluster take a holder for
            # gone while its client still holds.
            return any(overlaps(f, lo, hi) and f["target"] in (node, "zookeeper", "all")
                       for f in h.faults)

        def any_fault(lo, hi):
            return any(overlaps(f, lo, hi) for f in h.faults)

        by_message = {}
        for r in h.deliveries:
            by_message.setdefault((r["a"], r["v"]), []).append(r)
            msgs = mailboxes.get(r["a"], [])
            if r["v"] > len(msgs) or msgs[r["v"] - 1]["id"] != r["id"]:
                h.violation(f"worker {r['worker']} was dealt {r['a']} v{r['v']} id {r['id']}, "
                            "not what the mailbox holds")
        twice = again = excused = again_in_fault = 0
        for (a, v), rs in by_message.items():
            rs.sort(key=lambda r: r["recv"])
            for i, r1 in enumerate(rs):
                # r1's hold ends at its ack, at its connection's end, or at the ack timeout
                # (no worker holds that long; a margin for the deal before the delivery).
                ends = [x for x in (r1["ack"], r1["end"]) if x is not None]
                end1 = min(ends + [r1["recv"] + WORK_ACK_TIMEOUT - 1])
                closed = h.conn_closed.get(r1["conn"], float("inf"))
                for r2 in rs[i + 1:]:
                    if r2["recv"] < end1 and node_fault(r1["recv"], r2["recv"], r1["node"]):
                        excused += 1
                    elif r2["recv"] < end1:
                        twice += 1
                        h.violation(f"{a} v{v} held by two at once: worker {r1['worker']} "
                                    f"(node {r1['node']}) from {r1['recv']:.2f} to {end1:.2f}, "
                                    f"worker {r2['worker']} (node {r2['node']}) from {r2['recv']:.2f}")
                    # Done: an ack not refused, its connection up a second after it (so the
                    # node had it), is never dealt again — unless a fault came between (a crash
                    # can lose the last 20 ms of done marks; a shard move, an ack in flight).
                    done_before = (r1["ack"] is not None and not r1["refused"]
                                   and closed >= r1["ack"] + 1 and r2["recv"] > r1["ack"])
                    if done_before and any_fault(r1["ack"] - 1, r2["recv"]):
                        again_in_fault += 1
                    elif done_before:
                        again += 1
                        h.violation(f"{a} v{v} done by worker {r1['worker']} at {r1['ack']:.2f} "
                                    f"and dealt again to worker {r2['worker']} at {r2['recv']:.2f}")
        h.counts["work_dealt_again"] = sum(len(rs) - 1 for rs in by_message.values())
        log(f"work: {len(h.deliveries)} deliveries of {len(by_message)} messages to "
            f"{len(run.workers)} workers ({h.counts['work_dealt_again']} dealt again); "
            f"{twice} held by two at once ({excused} more while a fault took the holder's "
            f"node or ZooKeeper out), {again} dealt again once done ({again_in_fault} more "
            "with a fault between)")
        h.counts["work_two_holders_in_a_fault"] = excused
        h.counts["work_done_dealt_again_in_a_fault"] = again_in_fault


def plot(result, path):
    """Acknowledged messages per second, with the faults as bands below, one lane per kind (SVG)."""
    per_sec = dict(result["throughput"])
    faults = result["fault_timeline"]
    end = max(list(per_sec) + [f["end"] for f in faults] + [1])
    top = max(list(per_sec.values()) + [1])
    left, w, h, lane = 130, 900, 220, 14
    kinds = sorted({" ".join(f["kind"].split(" ")[:2]) for f in faults})
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f", "#1f77b4"]
    x = lambda t: left + (w - left - 10) * t / end  # noqa: E731
    y = lambda n: 24 + (h - 44) * (1 - n / top)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30 + lane * len(kinds)}"'
           ' font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="#fff"/>',
           f'<text x="{left}" y="14">acknowledged messages per second (0 to {top}) under'
           f' {len(faults)} faults — seed {result["seed"]}, {result["messages_in_mailboxes"]}'
           f' messages, {result["lost"]} lost</text>',
           f'<line x1="{left}" y1="{h - 20}" x2="{w - 10}" y2="{h - 20}" stroke="#999"/>']
    pts = " ".join(f"{x(t):.1f},{y(per_sec.get(t, 0)):.1f}" for t in range(0, int(end) + 1))
    out.append(f'<polyline fill="none" stroke="#1f77b4" points="{pts}"/>')
    for k, kind in enumerate(kinds):
        yy = h + 4 + lane * k
        out.append(f'<text x="{left - 6}" y="{yy + 10}" text-anchor="end">{kind}</text>')
        for f in faults:
            if " ".join(f["kind"].split(" ")[:2]) == kind:
                out.append(f'<rect x="{x(f["start"]):.1f}" y="{yy}" '
                           f'width="{max(2, x(f["end"]) - x(f["start"])):.1f}" height="{lane - 3}" '
                           f'fill="{colors[k % len(colors)]}"><title>{f["kind"]} {f["target"]}'
                           f'</title></rect>')
    for t in range(0, int(end) + 1, 10 if end <= 200 else 60):
        out.append(f'<text x="{x(t):.1f}" y="{h - 6}" text-anchor="middle">{t}s</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--seconds", type=int, default=180, help="longest run before healing")
    p.add_argument("--messages", type=int, default=100000, help="stop producing after this many")
    p.add_argument("--faults", type=int, default=30)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--workers", type=int, default=4, help="clients of the work addresses")
    p.add_argument("--producers", type=int, default=4, help="HTTP producers (threads)")
    p.add_argument("--out", default=os.path.join(ROOT, ".chaos"))
    args = p.parse_args()
    run = Run(args)
    ok = False
    try:
        ok = run.go()
    finally:
        for n in run.nodes:
            n.stop()
    print(("PASSED" if ok else "FAILED") + f": seed {args.seed} (replay: --seed {args.seed})")
    if not ok:
        for v in run.h.violations[:50]:
            print("  ", v)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
