"""The transport floor: Affinity's gRPC stack answering ``Recommend`` with a fixed response.

Same ``grpcio`` server, thread pool size, interceptors (metrics, concurrency limit, error mapping),
message types and SO_REUSEPORT worker processes as ``affinity serve``, but the handler returns a
pre-built ten-item response without touching a model, so the ratio of Affinity's throughput to this
server's is how close Affinity gets to what the transport itself allows.

Run ``python -m bench.floor --port N --workers W``; it stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from concurrent import futures
from types import FrameType

import grpc

from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.cpus import AUTO, pin_worker, validate_spec
from service.interceptors import ConcurrencyLimitInterceptor, ErrorInterceptor, MetricsInterceptor
from service.server import SPARE_THREADS

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
"""The default ``--max-in-flight`` of ``affinity serve``."""


def fixed_response(k: int = 10) -> pb.RecommendResponse:
    """A response shaped like a real one: ``k`` items, source, model ref, recommendation id."""
    return pb.RecommendResponse(
        items=[
            pb.ScoredItem(item_id=f"i{i:06d}", score=1.0 / (i + 1), item_type="product")
            for i in range(k)
        ],
        source=pb.SOURCE_PERSONALIZED,
        model=pb.ModelRef(name="affinity", version="1", run_id="0" * 32, algorithm="als"),
        recommendation_id="0" * 32,
    )


class FixedServicer(pb_grpc.RecommenderServicer):
    """Returns the same response to every ``Recommend`` and ``SimilarItems`` call."""

    def __init__(self) -> None:
        self.recommend = fixed_response()
        self.similar = pb.SimilarItemsResponse(
            items=self.recommend.items,
            model=self.recommend.model,
            recommendation_id=self.recommend.recommendation_id,
        )

    def Recommend(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.RecommendResponse:
        return self.recommend

    def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> pb.SimilarItemsResponse:
        return self.similar


def serve_one(
    port: int, *, reuse_port: bool, cpus: str = AUTO, slot: int = 0, workers: int = 1
) -> None:
    """Run one floor server process on ``port`` until SIGTERM/SIGINT.

    Pinned to a CPU the way ``affinity serve`` pins its worker ``slot`` (``--cpus``).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT + SPARE_THREADS),
        interceptors=[
            MetricsInterceptor(),
            ConcurrencyLimitInterceptor(MAX_IN_FLIGHT),
            ErrorInterceptor(),
        ],
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    pb_grpc.add_RecommenderServicer_to_server(FixedServicer(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    pin_worker(cpus, slot, workers)
    server.start()
    stop.wait()
    server.stop(1).wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--cpus", default=AUTO, type=validate_spec, help="as affinity serve --cpus (default auto)"
    )
    parser.add_argument("--worker", type=int, metavar="SLOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None or args.workers == 1:
        slot = args.worker or 0
        serve_one(
            args.port,
            reuse_port=args.worker is not None,
            cpus=args.cpus,
            slot=slot,
            workers=args.workers,
        )
        return 0
    command = [sys.executable, "-m", "bench.floor", "--port", str(args.port), "--cpus", args.cpus]
    command += ["--workers", str(args.workers)]
    procs = [subprocess.Popen([*command, "--worker", str(i)]) for i in range(args.workers)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    stop.wait()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
