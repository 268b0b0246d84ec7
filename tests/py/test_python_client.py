"""The contract with the official python-socketio client: connect, bind, receive, ack, miss
messages, resume on a restarted node, get exactly the missing ones, then `synced`."""

import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import socketio

BIN = os.environ.get(
    "SIGNALPOST_BIN",
    os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "signalpost"),
)


def cluster_env(data_dir):
    """On the cluster backend (SIGNALPOST_TEST_BACKEND=cluster), a node and its restarts get their
    own keyspace, topics and consumer group."""
    if os.environ.get("SIGNALPOST_TEST_BACKEND", "embedded") != "cluster":
        return {}
    tag = re.sub(r"[^A-Za-z0-9]", "", data_dir)[-12:].lower()
    return {
        "SIGNALPOST_BACKEND": "cluster",
        "SIGNALPOST_CASSANDRA_KEYSPACE": f"py_{tag}",
        "SIGNALPOST_KAFKA_TOPIC_PREFIX": f"py-{tag}.",
        "SIGNALPOST_KAFKA_GROUP": f"py-{tag}",
        "SIGNALPOST_KAFKA_PARTITIONS": "2",
        "SIGNALPOST_ZOOKEEPER_ROOT": f"/py-{tag}",
        "SIGNALPOST_CLUSTER_SECRET": "py-cluster-secret-0123456789abcdef",
    }


class Node:
    """A node on `data_dir` (on the backend the tests run on), with extra `env`; its log goes to
    `stderr` (a file, or nowhere)."""

    def __init__(self, data_dir, env=None, stderr=subprocess.DEVNULL):
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "RUST_LOG": "warn", **cluster_env(data_dir), **(env or {})},
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"listening on (http://[0-9.]+:\d+)", line)
            if m:
                self.url = m.group(1)
                return
        raise RuntimeError("node did not start")

    def api(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=20)


class Client:
    def __init__(self, url, auth=None):
        self.events = []
        self.cond = threading.Condition()
        self.sio = socketio.Client(reconnection=False)
        # python-engineio's threaded client runs every message handler on a thread of its own
        # (engineio/client.py: `_trigger_event('message', ..., run_async=True)`), so two events
        # can be recorded out of wire order (seen once in CI: versions 10, 9). The test checks
        # the order the server sent, so message handlers run inline, in arrival order.
        trigger = self.sio.eio._trigger_event

        def inline(event, *args, **kwargs):
            kwargs["run_async"] = False
            return trigger(event, *args, **kwargs)

        self.sio.eio._trigger_event = inline
        for name in ("session", "signal", "synced", "bound", "unbound", "gap"):
            self.sio.on(name, self._recorder(name))
        self.sio.connect(url, auth=auth or {}, transports=["websocket"], wait_timeout=10)

    def _recorder(self, name):
        def record(data):
            with self.cond:
                self.events.append((name, data))
                self.cond.notify_all()
        return record

    def wait(self, pred, timeout=20):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.events), timeout), f"timed out; got {self.events[-3:]}"

    def first(self, name):
        return next(d for (n, d) in self.events if n == name)

    def signals(self, address):
        return [d for (n, d) in self.events if n == "signal" and d["address"] == address]


def test_python_client_resumes_exactly_the_missed_messages(data_dir):
    node = Node(data_dir)
    c = Client(node.url)
    c.wait(lambda ev: any(n == "synced" for n, _ in ev))
    session = c.first("session")
    ch = "channel:py"
    status, _ = node.api("POST", "/server/connect", {"client": session["clientId"], "addresses": [ch]})
    assert status == 200
    c.wait(lambda ev: any(n == "bound" for n, _ in ev))
    status, body = node.api("POST", "/server/enqueue?wait=true", {"address": ch, "payload": {"hi": 1}})
    assert (status, body["version"]) == (200, 1)
    c.wait(lambda ev: len([1 for n, d in ev if n == "signal"]) >= 1)
    assert c.signals(ch)[0]["payload"] == {"hi": 1}
    c.sio.emit("ack", {"address": ch, "version": 1})
    time.sleep(0.3)
    c.sio.disconnect()

    batch = [{"address": ch, "payload": {"n": i}, "id": f"py-{i}"} for i in range(1000)]
    for i in range(0, 1000, 250):
        status, _ = node.api("POST", "/server/enqueue?wait=true", batch[i:i + 250])
        assert status == 200
    assert node.stop() == 0
    node = Node(data_dir)
    try:
        back = Client(node.url, {"clientId": session["clientId"], "resumeToken": session["resumeToken"]})
        back.wait(lambda ev: any(n == "synced" for n, _ in ev))
        got = back.signals(ch)
        assert [s["version"] for s in got] == list(range(2, 1002))
        assert [s["payload"]["n"] for s in got] == list(range(1000))
        assert back.first("synced")["cursors"][ch] == 1001
        back.sio.disconnect()
    finally:
        node.stop()
