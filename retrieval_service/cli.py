"""`research index` and `research serve`: build a faiss index from a corpus, and serve it over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from retrieval_service.config import DEFAULT_ENCODER, EncoderConfig, RetrievalConfig, ServerConfig

TOKEN_ENV = "RESEARCH_RETRIEVAL_TOKEN"


def index_main(argv: list[str] | None = None) -> int:
    """Entry point of `research index --corpus FILE --out DIR [...]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="research index", description="Encode a corpus into a faiss index.")
    parser.add_argument("--corpus", required=True, help="wiki-18 style .jsonl or .parquet corpus")
    parser.add_argument("--out", required=True, help="index directory to write (rerun to resume)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder name or path (default: packaged MiniLM)")
    parser.add_argument("--factory", default="Flat", help="faiss index_factory string: Flat, HNSW32, IVF4096,PQ64 ...")
    parser.add_argument("--shard-size", type=int, default=100_000, help="passages per resumable shard")
    parser.add_argument("--batch-size", type=int, default=64, help="passages per encoder forward")
    parser.add_argument("--max-length", type=int, default=512, help="passage token limit")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads on CPU (0 = all cores)")
    parser.add_argument("--ray-actors", type=int, default=0, help="encode shards on this many Ray actors (0 = here)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs each encoding actor reserves")
    parser.add_argument("--train-size", type=int, default=1_000_000, help="vectors used to train IVF/PQ factories")
    parser.add_argument("--max-new-shards", type=int, default=None, help="stop after encoding this many shards")
    parser.add_argument("--keep-shards", action="store_true", help="keep build/ shards after assembly")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from retrieval_service.build import build_index

    encoder = EncoderConfig(
        name_or_path=args.encoder,
        batch_size=args.batch_size,
        passage_max_length=args.max_length,
        device=args.device,
        cpu_threads=args.cpu_threads,
    )
    if args.ray_actors > 0:
        import ray

        if args.ray_address:
            ray.init(address=args.ray_address, ignore_reinit_error=True)
        else:  # a local cluster stays on loopback
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, ignore_reinit_error=True)
    try:
        meta = build_index(
            args.corpus,
            args.out,
            encoder,
            factory=args.factory,
            shard_size=args.shard_size,
            ray_actors=args.ray_actors,
            ray_gpus_per_actor=args.ray_gpus_per_actor,
            train_size=args.train_size,
            max_new_shards=args.max_new_shards,
            keep_shards=args.keep_shards,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"research index: {error}", file=sys.stderr)
        return 2
    if meta is None:
        print(f"research index: stopped early; rerun the same command to resume into {args.out}")
        return 0
    print(f"research index: {meta.count} passages, {meta.dim}-d, {meta.factory}, encoder {meta.encoder} -> {args.out}")
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `research serve --index DIR [--host 127.0.0.1] [--port P]`; returns the exit code."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="research serve", description="Serve a faiss index over HTTP.")
    parser.add_argument("--index", required=True, help="index directory written by `research index`")
    parser.add_argument("--host", default=defaults.host, help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--encoder", default=None, help="query encoder (default: the one recorded in the index)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads on CPU (0 = all cores)")
    parser.add_argument("--topk", type=int, default=5, help="default top-k when a request does not say")
    parser.add_argument("--max-batch", type=int, default=defaults.micro_batch_max_size)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.micro_batch_max_wait_ms)
    parser.add_argument("--batch-workers", type=int, default=defaults.micro_batch_workers, help="concurrent batches")
    parser.add_argument("--no-micro-batching", action="store_true", help="one encoder forward per request")
    parser.add_argument("--cache-size", type=int, default=defaults.cache_size)
    parser.add_argument("--faiss-gpu", action="store_true", help="shard the index over all visible GPUs")
    parser.add_argument("--faiss-threads", type=int, default=defaults.faiss_threads, help="faiss OpenMP threads (0 = default)")
    parser.add_argument("--access-log", action="store_true", help="log every request (costs CPU at high QPS)")
    parser.add_argument("--token-env", default=TOKEN_ENV, help="environment variable holding the bearer token")
    args = parser.parse_args(argv)

    import uvicorn

    from retrieval_service.app import create_app, uvicorn_config
    from retrieval_service.index import read_meta

    try:
        meta = read_meta(args.index)
    except (FileNotFoundError, ValueError) as error:
        print(f"research serve: {error}", file=sys.stderr)
        return 2
    token = os.environ.get(args.token_env) or None
    if args.host not in {"127.0.0.1", "localhost", "::1"} and token is None:
        logging.getLogger(__name__).warning("serving on %s without a bearer token (set $%s)", args.host, args.token_env)
    config = RetrievalConfig(
        encoder=EncoderConfig(
            name_or_path=args.encoder or meta.encoder, device=args.device, cpu_threads=args.cpu_threads
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            micro_batch_max_size=args.max_batch,
            micro_batch_max_wait_ms=args.max_wait_ms,
            micro_batch_workers=args.batch_workers,
            micro_batching=not args.no_micro_batching,
            cache_size=args.cache_size,
            auth_token=token,
            faiss_gpu=args.faiss_gpu,
            faiss_threads=args.faiss_threads,
        ),
        index_dir=args.index,
        topk=args.topk,
    )
    if args.encoder is not None:
        # Fail before binding the port: a mismatched encoder would only surface in /health otherwise.
        from retrieval_service.index import canonical_encoder_name

        if canonical_encoder_name(args.encoder) != canonical_encoder_name(meta.encoder):
            print(
                f"research serve: index {args.index} was built with encoder {meta.encoder!r}, not {args.encoder!r}",
                file=sys.stderr,
            )
            return 2
    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level="info", access_log=args.access_log)).run()
    return 0
