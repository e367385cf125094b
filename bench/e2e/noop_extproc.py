"""The floor of the Python gRPC stack: a grpc.aio ext_proc that does no work.

Same server setup as `llmlb serve` (grpc.aio on uvloop, one process, same message limits) and the
same BUFFERED conversation (request headers, request body, response headers), but every answer is
a prebuilt message: the body answer sets the destination header, cycling over the endpoints.

    python bench/e2e/noop_extproc.py --listen 127.0.0.1:9002 --endpoints 127.0.0.1:8001,...
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

LIMIT = 64 * 1024 * 1024
HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
EMPTY = pb.ProcessingResponse()


def body_answer(endpoint: str) -> pb.ProcessingResponse:
    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="x-gateway-destination-endpoint", raw_value=endpoint.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    mutation = pb.HeaderMutation(set_headers=[header])
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=pb.CommonResponse(header_mutation=mutation))
    )


class NoopProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, endpoints: list[str]) -> None:
        self.bodies = itertools.cycle([body_answer(e) for e in endpoints])

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                yield HEADERS
            elif kind == "request_body":
                yield next(self.bodies)
            elif kind == "response_headers":
                yield RESPONSE_HEADERS
            else:
                yield EMPTY


async def serve(listen: str, endpoints: list[str]) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(endpoints), server)
    checker = health.aio.HealthServicer()
    await checker.set("envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(listen)
    await server.start()
    print(f"noop ext_proc listening on {listen}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--endpoints", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.endpoints.split(",")))


if __name__ == "__main__":
    main()
