"""docker-compose.yml cannot run here (no Docker engine); keep it honest by reading it: it parses,
names every service the stack needs plus three nodes, and the nodes point at those services."""

import os

import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_compose_names_every_service():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    names = set(services)
    for needed in ("cassandra", "kafka", "zookeeper"):
        assert needed in names, f"{needed} missing from {sorted(names)}"
    nodes = [n for n, s in services.items() if s.get("image", "").startswith("signalpost") and "serve" in s.get("command", [])]
    assert len(nodes) == 3, nodes
    for n in nodes:
        env = services[n].get("environment", {})
        env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
        assert services[n]["command"][services[n]["command"].index("--backend") + 1] == "cluster"
        for var, svc in (("SIGNALPOST_CASSANDRA", "cassandra"), ("SIGNALPOST_KAFKA", "kafka"), ("SIGNALPOST_ZOOKEEPER", "zookeeper")):
            assert svc in env.get(var, ""), f"{n}: {var}={env.get(var)}"
        # A cluster node refuses to start without a cluster secret, and on 0.0.0.0 without an
        # API key: the file must give both, long enough (the node checks the same minimums).
        for var, least in (("SIGNALPOST_CLUSTER_SECRET", 32), ("SIGNALPOST_RESUME_SECRET", 32), ("SIGNALPOST_API_KEY", 16)):
            assert len(str(env.get(var, ""))) >= least, f"{n}: {var} missing or shorter than {least}"
