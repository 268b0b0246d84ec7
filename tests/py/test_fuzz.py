"""A fuzz run against a live node: random HTTP requests (methods, paths, headers, bodies — JSON,
broken JSON, bytes) and random Socket.IO traffic (handshake `auth` objects, events with random
data, raw Engine.IO frames). The node must answer every request with a status below 500, keep
answering `/healthz`, never exit and never log a panic.

    python3 -m pytest -q tests/py/test_fuzz.py                          # 15 s (what CI runs)
    SIGNALPOST_FUZZ_SECONDS=600 python3 -m pytest -q tests/py/test_fuzz.py   # the 10-minute run
    SIGNALPOST_FUZZ_SEED=1234 …                                          # replay a seed

The seed is printed; a failure names it, the request and the answer."""

import http.client
import json
import os
import random
import threading
import time
import urllib.parse

import socketio
import websocket

import test_python_client

SECONDS = float(os.environ.get("SIGNALPOST_FUZZ_SECONDS", "15"))
SEED = int(os.environ.get("SIGNALPOST_FUZZ_SEED", str(random.randrange(1 << 30))))
API_KEY = "fuzz-api-key-0123456789"

PATHS = [
    "/", "/healthz", "/metrics", "/signalpost-client.js", "/socket.io/", "/socket.io/?EIO=4&transport=polling",
    "/server/enqueue", "/server/enqueue?wait=true", "/server/enqueue?wait=maybe", "/server/connect",
    "/server/disconnect", "/server/clients", "/server/clients/{c}", "/server/clients/{c}/bindings",
    "/server/mailbox/{a}", "/server/mailbox/{a}?after={n}&limit={n}", "/server/presence/{c}",
    "/server/nodes", "/server/kick", "/internal/want", "/internal/deliver", "/internal/kick",
    "/server/%00", "/server/..%2f..%2fetc/passwd", "/{junk}", "//server//enqueue",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
EVENTS = ["ack", "read", "history", "members", "refresh", "bind", "message", "signal", "session",
          "disconnect", "connect", "", "x" * 300, "__proto__"]


def junk(r, n=24):
    return "".join(r.choice("abc:/%?#&=\\\"'{}[],.\u00e9\u2603\ud7ff 0123456789") for _ in range(r.randrange(n)))


def address(r):
    return r.choice(["channel:", "client:", "presence:", "work:", "", "CHANNEL:", "channel:" * 2]) + junk(r, 12)


def value(r, depth=0):
    kinds = ["null", "bool", "int", "big", "float", "str", "addr"] + (["list", "obj"] if depth < 4 else [])
    k = r.choice(kinds)
    if k == "null": return None
    if k == "bool": return r.random() < 0.5
    if k == "int": return r.randrange(-10, 1 << 20)
    if k == "big": return r.choice([2 ** 64, -(2 ** 63) - 1, 10 ** 30])
    if k == "float": return r.choice([0.5, -1e300, 1e-300, 3.14])
    if k == "str": return junk(r)
    if k == "addr": return address(r)
    if k == "list": return [value(r, depth + 1) for _ in range(r.randrange(5))]
    keys = ["address", "payload", "id", "client", "addresses", "version", "versions", "token",
            "clientId", "resumeToken", "cursors", "since", "until", "limit", junk(r, 6)]
    return {r.choice(keys): value(r, depth + 1) for _ in range(r.randrange(5))}


def body(r):
    k = r.randrange(6)
    if k == 0: return b""
    if k == 1: return bytes(r.randrange(256) for _ in range(r.randrange(200)))
    if k == 2:
        text = json.dumps(value(r))
        return text[: r.randrange(len(text) + 1)].encode()
    if k == 3:  # escapes json.dumps does not write: lone surrogates, deep nesting, huge numbers
        return r.choice([
            b'{"address":"channel:a","payload":"\\ud800"}',
            b'{"address":"channel:a","payload":1e99999}',
            b'{"address":"channel:a","payload":' + b"[" * 100 + b"]" * 100 + b"}",
            b'[' + b'{"address":"channel:a","payload":1},' * 50 + b'{}]',
            b'{"client":"c","addresses":["channel:a","client:c"]}',
        ])
    return json.dumps(value(r)).encode()


class Node(test_python_client.Node):
    """The tests' node, with an API key, no handshake rate limit and its log kept (for panics)."""

    def __init__(self, data_dir):
        self.log = open(os.path.join(data_dir, "node.log"), "w+")
        super().__init__(data_dir, env={"SIGNALPOST_API_KEY": API_KEY, "SIGNALPOST_CONNECT_RATE_PER_IP": "0"},
                         stderr=self.log)
        u = urllib.parse.urlsplit(self.url)
        self.host, self.port = u.hostname, u.port
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.wait_ready()

    def wait_ready(self):
        for _ in range(600):
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("node not ready")

    def request(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=15)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def panics(self):
        self.log.flush()
        self.log.seek(0)
        return [l for l in self.log.read().splitlines() if "panicked" in l]


def http_round(r, node):
    method = r.choice(METHODS)
    path = r.choice(PATHS).format(c=junk(r, 10) or "c", a=address(r), n=r.choice(["-1", "0", "99999999999999999999", "x"]), junk=junk(r))
    # Raw bytes the request line cannot carry are percent-encoded (the rest is sent as it is).
    path = "/" + "".join(c if 32 < ord(c) < 127 and c != "#" else urllib.parse.quote(c) for c in path.lstrip("/"))
    headers = {}
    if r.random() < 0.8:
        headers["Authorization"] = r.choice([f"Bearer {API_KEY}", "Bearer wrong", "Basic x", ""])
    if r.random() < 0.5:
        headers["Content-Type"] = r.choice(["application/json", "text/plain", "multipart/form-data; boundary=x", ""])
    if r.random() < 0.2:
        headers["Origin"] = r.choice(["https://evil.example", "null", junk(r).encode("ascii", "ignore").decode()])
    data = body(r) if method not in ("GET", "HEAD") or r.random() < 0.2 else None
    status, answer = node.request(method, path, data, headers)
    assert status < 500 or status == 503, f"seed {SEED}: {method} {path} {data!r:.200} -> {status} {answer[:300]!r}"


def socket_round(r, node):
    url = f"http://{node.host}:{node.port}"
    k = r.randrange(3)
    if k < 2:  # a real client, random auth, random events
        sio = socketio.Client(reconnection=False)
        auth = value(r) if r.random() < 0.5 else {}
        try:
            sio.connect(url, auth=auth, transports=["websocket"], wait_timeout=5)
        except socketio.exceptions.ConnectionError:
            return
        try:
            for _ in range(r.randrange(1, 8)):
                ev = r.choice(EVENTS)
                if ev in ("connect", "disconnect", "connect_error"):
                    continue
                data = value(r)
                if r.random() < 0.5:
                    try:
                        sio.call(ev, data, timeout=0.3)
                    except (socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError):
                        pass
                else:
                    sio.emit(ev, data)
        except socketio.exceptions.BadNamespaceError:
            pass  # the node closed the connection (a refused event may end it): allowed
        finally:
            sio.disconnect()
    else:  # raw Engine.IO / Socket.IO frames
        ws = websocket.create_connection(f"ws://{node.host}:{node.port}/socket.io/?EIO=4&transport=websocket", timeout=5)
        try:
            ws.recv()
            frames = ["40", "40" + json.dumps(value(r)), "42" + json.dumps([r.choice(EVENTS), value(r)]),
                      "42" + junk(r), "4" + junk(r), "2", "3", "41", "43" + json.dumps([value(r)]),
                      "451-" + json.dumps(["ack", {"_placeholder": True, "num": 0}]), junk(r), "6", "5"]
            for _ in range(r.randrange(1, 6)):
                if r.random() < 0.2:
                    ws.send_binary(bytes(r.randrange(256) for _ in range(r.randrange(64))))
                else:
                    ws.send(r.choice(frames))
        except (websocket.WebSocketException, OSError):
            pass
        finally:
            ws.close()


def test_random_http_and_socket_traffic_never_breaks_the_node(data_dir):
    print(f"fuzz seed {SEED}, {SECONDS:.0f} s")
    node = Node(data_dir)
    counts = {"http": 0, "socket": 0}
    failures = []
    end = time.time() + SECONDS

    def loop(kind, one, r):
        # Each loop has its own generator from the seed, so a seed replays each loop's traffic.
        try:
            while time.time() < end and not failures:
                one(r, node)
                counts[kind] += 1
        except Exception as e:  # noqa: BLE001 — reported with the seed below
            failures.append(f"{kind}: {e!r}")

    loops = [threading.Thread(target=loop, args=("http", http_round, random.Random(SEED))),
             threading.Thread(target=loop, args=("socket", socket_round, random.Random(SEED + 1)))]
    try:
        for t in loops:
            t.start()
        while any(t.is_alive() for t in loops):
            assert node.proc.poll() is None, f"seed {SEED}: the node exited with {node.proc.returncode}"
            time.sleep(0.2)
        assert failures == [], f"seed {SEED}: {failures[0]}"
        node.wait_ready()
        assert node.panics() == [], f"seed {SEED}: {node.panics()[:3]}"
        print(f"fuzz: {counts['http']} HTTP requests, {counts['socket']} socket sessions, no 5xx, no panic")
    finally:
        node.proc.terminate()
        node.proc.wait(timeout=30)
