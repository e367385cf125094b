"""Every API users send, through real Envoy (both modes) and `llmlb sim` servers.

- Responses API conversations stay on one server with cached tokens from turn 2, whether the
  client re-sends the items or continues with ``previous_response_id`` (which only the server
  that stored the response can answer: llmlb learns ids from responses, and with Redis every
  replica knows them).
- Anthropic Messages conversations stick the same way; identical embeddings inputs land where
  they were cached.
- Affinity keys (``prompt_cache_key``, the session header) keep requests with different prompts
  together.
- A two-model pool never sends a request to a server without its model; an unknown model gets
  the picker's 404 ``model_not_found``; ``GET /v1/models`` lists the pool's models.
- Other paths are routed by load, not counted as bad bodies.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.procs import (
    MODES,
    Daemon,
    Envoy,
    ManagedProcess,
    Reply,
    Sim,
    SSEStream,
    get,
    metric_sum,
    post,
    start_daemon,
    start_envoy,
    start_sims,
    stop_all,
)
from tests.support.redis_servers import RedisServer, redis_server_binary

pytestmark = pytest.mark.e2e

NAME_HEADER = "x-sim-name"
SYSTEM = "You are a careful assistant who answers questions about distributed systems in detail. " * 4


@dataclass
class Fleet:
    sims: dict[str, Sim]
    daemons: list[Daemon]
    envoys: list[Envoy]

    def url(self, replica: int = 0) -> str:
        return self.envoys[replica % len(self.envoys)].url

    def reset(self) -> None:
        for sim in self.sims.values():
            sim.reset()

    def count(self, name: str, reason: str) -> float:
        """``name``'s samples with this reason, summed over the replicas."""
        return sum(metric_sum(d.metrics(), name, reason=reason) for d in self.daemons)

    def picks(self, reason: str) -> float:
        return self.count("llmlb_picks_total", reason)

    def fallbacks(self, reason: str) -> float:
        return self.count("llmlb_fallbacks_total", reason)


def _start_fleet(
    workdir: Path,
    sims: dict[str, list[str]],
    mode: str,
    config: dict[str, Any] | None = None,
    replicas: int = 1,
) -> tuple[Fleet, list[ManagedProcess]]:
    owned: list[ManagedProcess] = []
    try:
        started = {s.name: s for s in start_sims(sims, workdir)}
        owned.extend(s.proc for s in started.values())
        endpoints = [s.address for s in started.values()]
        extra: list[str] = []
        if config is not None:
            path = workdir / "llmlb.yaml"
            path.write_text(yaml.safe_dump(config))
            extra = ["--config", str(path)]
        daemons = []
        envoys = []
        for n in range(replicas):
            daemon = start_daemon(
                endpoints, "prefix_cache", workdir, name=f"llmlb-{mode}-{n}", extra_args=extra
            )
            owned.append(daemon.proc)
            daemons.append(daemon)
            envoy = start_envoy(endpoints, daemon.grpc_port, mode, workdir, name=f"envoy-{mode}-{n}")
            owned.append(envoy.proc)
            envoys.append(envoy)
    except BaseException:
        stop_all(reversed(owned))
        raise
    return Fleet(started, daemons, envoys), owned


@pytest.fixture(scope="module", params=MODES)
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three simulated servers of one model behind one picker, in each Envoy mode."""
    mode = str(request.param)
    workdir = tmp_path_factory.mktemp(f"apis-{mode}")
    fleet, owned = _start_fleet(workdir, {"a": [], "b": [], "c": []}, mode)
    yield fleet
    stop_all(reversed(owned))


def _served(reply: Reply) -> str:
    assert reply.status == 200, reply
    return reply.headers[NAME_HEADER]


# --- Responses API ---------------------------------------------------------------------------


def _response_text(body: dict[str, Any]) -> str:
    return "".join(
        part["text"] for item in body["output"] if item["type"] == "message" for part in item["content"]
    )


def _responses_call(url: str, body: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    """``(served by, the final response object)``, streamed or not."""
    if not stream:
        reply = post(f"{url}/v1/responses", body)
        return _served(reply), reply.json()
    with SSEStream(f"{url}/v1/responses", {**body, "stream": True}) as events:
        assert events.status == 200
        final = None
        for data in events.events():
            event = json.loads(data)
            if event["type"] == "response.completed":
                final = event["response"]
        assert final is not None, "no response.completed event"
        return events.headers[NAME_HEADER], final


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_responses_chain_by_previous_response_id_reaches_its_server(fleet: Fleet, stream: bool) -> None:
    fleet.reset()
    for chain in range(3):  # several chains: they spread, and each one stays home
        previous = None
        home = None
        for turn in range(5):
            # Instructions are not carried over from the previous response: sent every turn.
            body: dict[str, Any] = {
                "model": "sim-model",
                "instructions": SYSTEM,
                "input": f"chain {chain} turn {turn}: tell me more about consensus.",
                "max_output_tokens": 8,
            }
            if previous is not None:
                body["previous_response_id"] = previous
            served, response = _responses_call(fleet.url(), body, stream)
            home = home or served
            assert served == home, f"chain {chain} turn {turn} left {home} for {served}"
            if turn > 0:
                assert response["usage"]["input_tokens_details"]["cached_tokens"] > 0
            previous = response["id"]
    assert fleet.picks("stored_response") >= 3 * 4


def test_a_responses_conversation_resent_as_items_sticks_and_hits_the_cache(fleet: Fleet) -> None:
    fleet.reset()
    items: list[dict[str, Any]] = []
    home = None
    for turn in range(5):
        items.append({"role": "user", "content": f"question {turn} about replicated logs, please"})
        body = {
            "model": "sim-model",
            "instructions": SYSTEM,
            "input": items,
            "max_output_tokens": 8,
            "store": False,
        }
        reply = post(f"{fleet.url()}/v1/responses", body)
        served = _served(reply)
        home = home or served
        assert served == home
        response = reply.json()
        if turn > 0:
            assert response["usage"]["input_tokens_details"]["cached_tokens"] > 0
        items.extend(response["output"])


def test_an_unknown_previous_response_id_is_routed_not_refused(fleet: Fleet) -> None:
    before = fleet.fallbacks("bad_body")
    reply = post(
        f"{fleet.url()}/v1/responses",
        {"model": "sim-model", "input": "hi", "previous_response_id": "resp_never_seen"},
    )
    assert reply.status == 404  # the server's answer: nobody stored it
    assert "not found" in reply.text()
    assert fleet.fallbacks("bad_body") == before


def test_a_stored_response_is_read_back_from_its_server(fleet: Fleet) -> None:
    served, response = _responses_call(fleet.url(), {"model": "sim-model", "input": "keep this"}, False)
    for _ in range(4):
        reply = get(f"{fleet.url()}/v1/responses/{response['id']}")
        assert reply.status == 200, reply
        assert reply.headers[NAME_HEADER] == served
        assert reply.json()["id"] == response["id"]


# --- Anthropic Messages, embeddings ----------------------------------------------------------


def test_a_messages_conversation_sticks_and_hits_the_cache(fleet: Fleet) -> None:
    fleet.reset()
    messages: list[dict[str, Any]] = []
    home = None
    for turn in range(5):
        messages.append(
            {"role": "user", "content": [{"type": "text", "text": f"turn {turn}: explain quorum reads"}]}
        )
        body = {"model": "sim-model", "system": SYSTEM, "messages": messages, "max_tokens": 8}
        reply = post(f"{fleet.url()}/v1/messages", body)
        served = _served(reply)
        home = home or served
        assert served == home
        answer = reply.json()
        if turn > 0:
            assert answer["usage"]["cache_read_input_tokens"] > 0
        messages.append({"role": "assistant", "content": answer["content"]})


def test_identical_embedding_inputs_land_where_they_were_cached(fleet: Fleet) -> None:
    fleet.reset()
    homes: dict[int, str] = {}
    for round_ in range(3):
        for doc in range(4):
            text = f"document {doc}: " + "the log is replicated to a majority before it commits. " * 20
            reply = post(f"{fleet.url()}/v1/embeddings", {"model": "sim-model", "input": [text]})
            served = _served(reply)
            homes.setdefault(doc, served)
            assert served == homes[doc]
            if round_ > 0:
                assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# --- affinity keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["prompt_cache_key", "session_header"])
def test_an_affinity_key_keeps_different_prompts_together(fleet: Fleet, how: str) -> None:
    for session in range(3):
        served = set()
        for n in range(5):
            body: dict[str, Any] = {
                "model": "sim-model",
                "messages": [{"role": "user", "content": f"unrelated question {session}-{n}"}],
                "max_tokens": 2,
            }
            headers = {}
            if how == "prompt_cache_key":
                body["prompt_cache_key"] = f"tenant-{session}"
            else:
                headers["x-session-id"] = f"session-{session}"
            served.add(_served(post(f"{fleet.url()}/v1/chat/completions", body, headers=headers)))
        assert len(served) == 1, f"session {session} went to {served}"
    assert fleet.picks("affinity_key") >= 3 * 4


# --- other paths -----------------------------------------------------------------------------


def test_other_paths_are_routed_by_load_and_are_not_bad_bodies(fleet: Fleet) -> None:
    before = fleet.fallbacks("bad_body")
    picked = fleet.picks("least_request")
    reply = post(f"{fleet.url()}/v1/audio/transcriptions", b"\x00\x01 not json at all")
    assert reply.status == 404  # the sim serves no audio; what matters is that it got the request
    assert "x-envoy-upstream-service-time" in reply.headers
    assert fleet.picks("least_request") == picked + 1
    listing = get(f"{fleet.url()}/v1/models")
    assert listing.status == 200
    assert [m["id"] for m in listing.json()["data"]] == ["sim-model"]
    assert fleet.fallbacks("bad_body") == before
    reply = post(f"{fleet.url()}/v1/chat/completions", b"{not json")
    assert "x-envoy-upstream-service-time" in reply.headers
    assert fleet.fallbacks("bad_body") == before + 1


# --- multi-model pools -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_two_model_pool_never_misroutes(mode: str, tmp_path: Path) -> None:
    sims = {
        "one-a": ["--models", "model-one"],
        "one-b": ["--models", "model-one"],
        "two": ["--models", "model-two"],
    }
    fleet, owned = _start_fleet(tmp_path, sims, mode)
    try:
        serving = {"model-one": {"one-a", "one-b"}, "model-two": {"two"}}
        seen: dict[str, set[str]] = {"model-one": set(), "model-two": set()}
        for n, model in zip(range(24), itertools.cycle(serving)):
            reply = post(
                f"{fleet.url()}/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": f"question {n}"}], "max_tokens": 2},
            )
            seen[model].add(_served(reply))
        assert seen["model-one"] == serving["model-one"]  # spread over both of its servers
        assert seen["model-two"] == serving["model-two"]
        for path, body in (
            (
                "/v1/chat/completions",
                {"model": "model-three", "messages": [{"role": "user", "content": "x"}]},
            ),
            ("/v1/responses", {"model": "model-three", "input": "x"}),
            ("/v1/embeddings", {"model": "model-three", "input": "x"}),
        ):
            reply = post(f"{fleet.url()}{path}", body)
            assert reply.status == 404, reply
            assert NAME_HEADER not in reply.headers  # the picker answered
            error = reply.json()["error"]
            assert error["type"] == "model_not_found"
            assert "model-three" in error["message"]
        listing = get(f"{fleet.url()}/v1/models")
        assert sorted(m["id"] for m in listing.json()["data"]) == ["model-one", "model-two"]
    finally:
        stop_all(reversed(owned))


# --- two replicas sharing Redis ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_two_replicas_share_stored_responses_through_redis(mode: str, tmp_path: Path) -> None:
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("no redis-server: make deps installs it")
    server = RedisServer(binary, tmp_path / "redis")
    with server.start():
        config = {"lb_config": {"serviceFQDN": "127.0.0.1", "servicePort": server.port}}
        fleet, owned = _start_fleet(tmp_path, {"a": [], "b": [], "c": []}, mode, config, replicas=2)
        try:
            for chain in range(2):
                previous = None
                home = None
                for turn in range(5):
                    body: dict[str, Any] = {"model": "sim-model", "input": f"chain {chain} turn {turn}"}
                    if previous is not None:
                        body["previous_response_id"] = previous
                    # Turns alternate between the two gateways (and so the two pickers).
                    served, response = _responses_call(fleet.url(turn), body, stream=turn % 2 == 1)
                    home = home or served
                    assert served == home, f"chain {chain} turn {turn} via replica {turn % 2}"
                    previous = response["id"]
        finally:
            stop_all(reversed(owned))


def test_the_official_openai_sdk_chains_responses_through_the_gateway(fleet: Fleet) -> None:
    """As a new user would: the SDK's defaults (store, previous_response_id, base64 embeddings)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{fleet.url()}/v1", api_key="unused", max_retries=0, timeout=10)
    response = client.responses.create(model="sim-model", instructions=SYSTEM, input="first question")
    for turn in range(5):  # before llmlb learned ids, turns 1, 3 and 5 of such a chain got 404
        response = client.responses.create(
            model="sim-model",
            instructions=SYSTEM,
            input=f"follow-up {turn}",
            previous_response_id=response.id,
        )
        assert response.usage is not None
        assert response.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(response.id).id == response.id
    vectors = client.embeddings.create(model="sim-model", input=["a", "b"])
    assert len(vectors.data) == 2
    assert [m.id for m in client.models.list()] == ["sim-model"]
