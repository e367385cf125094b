"""A client side of Envoy's ext_proc ``Process`` stream, for talking to the daemon without Envoy."""

from __future__ import annotations

import queue
import threading

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

DEST = "x-gateway-destination-endpoint"


def bodyless_request(path: str = "/v1/models") -> pb.ProcessingRequest:
    """The first (and only request-side) message of a body-less request such as a GET: the
    picker picks on it at once, and the stream then stays open, in flight, until it ends."""
    values = {":method": "GET", ":path": path}
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
            ),
            end_of_stream=True,
        )
    )


def picked_header(mutation: pb.HeaderMutation) -> str:
    """The endpoint a header mutation routes to (exactly one destination header)."""
    values = [h.header.raw_value.decode() for h in mutation.set_headers if h.header.key == DEST]
    assert len(values) == 1, mutation
    return values[0]


class ExtProcCall:
    """A bidirectional Process stream fed message by message, answers read on a thread."""

    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._outbox: queue.Queue[pb.ProcessingRequest | None] = queue.Queue()
        stub = pb_grpc.ExternalProcessorStub(channel)
        self.call = stub.Process(iter(self._outbox.get, None), timeout=timeout)
        self._inbox: queue.Queue[pb.ProcessingResponse | BaseException] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._inbox.put(response)
        except grpc.RpcError as e:
            self._inbox.put(e)

    def send(self, request: pb.ProcessingRequest) -> None:
        self._outbox.put(request)

    def recv(self, timeout: float | None = None) -> pb.ProcessingResponse:
        item = self._inbox.get(timeout=self.timeout if timeout is None else timeout)
        assert isinstance(item, pb.ProcessingResponse), item
        return item

    def nothing_within(self, seconds: float) -> bool:
        try:
            self._inbox.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        """Half-closes the stream (Envoy's normal end)."""
        self._outbox.put(None)

    def cancel(self) -> None:
        """Resets the stream (what Envoy does on a client abort)."""
        self.call.cancel()
