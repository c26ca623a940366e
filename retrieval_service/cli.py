"""`research index` and `research serve`: build a faiss index from a corpus, and serve it over HTTP.

Their flags are generated from the config models' fields (type, bounds, default and help come from the Field), so a
field's description is its flag's help and a value is validated exactly as in a YAML config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from retrieval_service.config import TOKEN_ENV, EncoderConfig, IndexBuildConfig, RetrievalConfig, ServerConfig

Model = TypeVar("Model", bound=BaseModel)


class ConfigFlags:
    """Flags of an argparse parser generated from pydantic model fields; values are validated by the model.

    pydantic-settings' CliSettingsSource can also do this, but it names flags by dotted field path
    (--server.micro-batch-workers), reads environment variables into the models (a stray $HOST would move the
    service), exposes every field (the bearer token would land in argv) unless the shared config models are
    annotated for it, and is not a declared dependency; this keeps the flag names users already type.
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.flags: dict[tuple[str, str], str] = {}  # (section, field) -> flag

    def add(self, model: type[BaseModel], section: str, fields: Iterable[str] | None = None,
            names: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None,
            required: Iterable[str] = ()) -> None:
        """One flag per field (all fields when `fields` is None), named --field-name unless `names` renames it;
        `defaults` replaces the shown default of a field whose default is decided elsewhere."""
        names, defaults, required = names or {}, defaults or {}, set(required)
        group = self.parser.add_argument_group(f"{section} ({model.__name__})")
        for name in fields or model.model_fields:
            field = model.model_fields[name]
            flag = names.get(name, "--" + name.replace("_", "-"))
            self.flags[(section, name)] = flag
            kwargs = _argparse_kwargs(field.annotation, flag)
            shown = "required" if name in required else f"default: {defaults.get(name, field.get_default())}"
            help_ = f"{field.description} ({shown})".replace("%", "%%").replace("`", "")  # plain text, not markdown
            group.add_argument(flag, dest=f"{section}.{name}", default=argparse.SUPPRESS, required=name in required,
                               help=help_, **kwargs)

    def given(self, args: argparse.Namespace, section: str) -> dict[str, Any]:
        """The values of a section's flags that were given on the command line."""
        return {dest.split(".", 1)[1]: value for dest, value in vars(args).items() if dest.startswith(section + ".")}

    def build(self, model: type[Model], args: argparse.Namespace, section: str, **values: Any) -> Model:
        """The model from `values` plus the given flags; a ValueError names the offending flag."""
        try:
            return model.model_validate({**values, **self.given(args, section)})
        except ValidationError as err:
            problems = []
            for problem in err.errors():
                field = str(problem["loc"][0]) if problem["loc"] else ""
                flag = self.flags.get((section, field), field)
                problems.append(f"{flag}: {problem['msg']} (got {problem.get('input')!r})")
            raise ValueError("; ".join(problems)) from None


def _argparse_kwargs(annotation: Any, flag: str) -> dict[str, Any]:
    """type/choices/action/metavar of the flag of a field with this annotation (X | None is X)."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is not Literal and len(options) == 1:
        annotation = options[0]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is Literal:
        choices = list(typing.get_args(annotation))
        return {"type": type(choices[0]), "choices": choices}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": flag.lstrip("-").replace("-", "_").upper()}
    raise TypeError(f"no command-line flag for a field of type {annotation}")


def _parser(prog: str, usage: str, description: str) -> tuple[argparse.ArgumentParser, ConfigFlags]:
    """A parser with a short usage line (argparse prints it above a usage error) and its config flags."""
    parser = argparse.ArgumentParser(prog=prog, usage=usage, description=description)
    return parser, ConfigFlags(parser)


def index_parser() -> tuple[argparse.ArgumentParser, ConfigFlags]:
    """The parser of `research index`: corpus and output, then IndexBuildConfig and EncoderConfig fields."""
    parser, flags = _parser("research index", "%(prog)s --corpus FILE --out DIR [options]",
                            "Encode a corpus into a faiss index (rerun the same command to resume).")
    parser.add_argument("--corpus", required=True, help="wiki-18 style .jsonl or .parquet corpus")
    parser.add_argument("--out", required=True, help="index directory to write (rerun to resume)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--faiss-index", default=None, metavar="FILE",
                        help="adopt a faiss index built elsewhere over this corpus (row i = passage i) with the same "
                        "encoder instead of encoding: checked on re-encoded sample passages, then linked or copied")
    flags.add(IndexBuildConfig, "build")
    flags.add(EncoderConfig, "encoder", ["name_or_path", "batch_size", "passage_max_length", "device", "cpu_threads",
                                         "fp16"], names={"name_or_path": "--encoder", "passage_max_length": "--max-length"})
    return parser, flags


def index_main(argv: list[str] | None = None) -> int:
    """Entry point of `research index --corpus FILE --out DIR [...]`; returns the exit code."""
    parser, flags = index_parser()
    args = parser.parse_args(argv)
    try:
        build = flags.build(IndexBuildConfig, args, "build")
        encoder = flags.build(EncoderConfig, args, "encoder")
    except ValueError as error:
        return _fail(parser, error)

    from retrieval_service.build import adopt_index, build_index

    if args.no_progress:  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.faiss_index:
        try:
            meta = adopt_index(args.corpus, args.out, encoder, args.faiss_index, progress=not args.no_progress)
        except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: faiss cannot read the file
            return _fail(parser, error)
        print(f"research index: adopted {args.faiss_index} ({meta.count} passages, {meta.dim}-d, {meta.factory}, "
              f"encoder {meta.encoder}) -> {args.out}")
        return 0
    if build.ray_actors > 0:
        import ray

        if args.ray_address:
            ray.init(address=args.ray_address, ignore_reinit_error=True)
        else:  # a local cluster stays on loopback
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, ignore_reinit_error=True)
    try:
        meta = build_index(args.corpus, args.out, encoder, **build.model_dump(), progress=not args.no_progress)
    except (ValueError, OSError) as error:
        return _fail(parser, error)
    if meta is None:
        print(f"research index: stopped early; rerun the same command to resume into {args.out}")
        return 0
    print(f"research index: {meta.count} passages, {meta.dim}-d, {meta.factory}, encoder {meta.encoder} -> {args.out}")
    return 0


def serve_parser() -> tuple[argparse.ArgumentParser, ConfigFlags]:
    """The parser of `research serve`: index_dir and topk, ServerConfig and query-side EncoderConfig fields."""
    parser, flags = _parser("research serve", "%(prog)s --index DIR [options]", "Serve a faiss index over HTTP.")
    parser.add_argument("--access-log", action="store_true", help="log every request (costs CPU at high QPS)")
    parser.add_argument("--token-env", default=TOKEN_ENV,
                        help=f"environment variable holding the bearer token (default: {TOKEN_ENV})")
    flags.add(RetrievalConfig, "retrieval", ["index_dir", "topk"], names={"index_dir": "--index"},
              required=["index_dir"])
    flags.add(ServerConfig, "server", [name for name in ServerConfig.model_fields if name != "auth_token"],
              names={"micro_batch_max_size": "--max-batch", "micro_batch_max_wait_ms": "--max-wait-ms",
                     "micro_batch_workers": "--batch-workers"})
    flags.add(EncoderConfig, "encoder", ["name_or_path", "device", "cpu_threads", "fp16", "query_max_length",
                                         "query_batch_size", "cpu_runtime", "cpu_query_dtype",
                                         "cpu_compile"],
              names={"name_or_path": "--encoder"}, defaults={"name_or_path": "the encoder recorded in the index"})
    return parser, flags


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `research serve --index DIR [--host 127.0.0.1] [--port P]`; returns the exit code."""
    parser, flags = serve_parser()
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env) or None
    index_dir = getattr(args, "retrieval.index_dir")
    try:
        server = flags.build(ServerConfig, args, "server", auth_token=token)
        encoder = flags.build(EncoderConfig, args, "encoder")  # validated before the index is read
        retrieval = flags.build(RetrievalConfig, args, "retrieval")
    except ValueError as error:
        return _fail(parser, error)

    import uvicorn

    from retrieval_service.app import create_app, uvicorn_config
    from retrieval_service.index import canonical_encoder_name, read_meta

    try:
        meta = read_meta(index_dir)
    except (OSError, ValueError) as error:
        return _fail(parser, error)
    given_encoder = flags.given(args, "encoder").get("name_or_path")
    if given_encoder is not None and canonical_encoder_name(given_encoder) != canonical_encoder_name(meta.encoder):
        # Fail before binding the port: a mismatched encoder would only surface in /health otherwise.
        return _fail(parser, f"index {index_dir} was built with encoder {meta.encoder!r}, not {given_encoder!r}")
    if server.host not in {"127.0.0.1", "localhost", "::1"} and token is None:
        logging.getLogger(__name__).warning("serving on %s without a bearer token (set $%s)", server.host, args.token_env)
    config = retrieval.model_copy(update={
        "server": server, "encoder": encoder.model_copy(update={"name_or_path": given_encoder or meta.encoder}),
    })
    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, server.host, server.port, log_level="info", access_log=args.access_log)).run()
    return 0


def _fail(parser: argparse.ArgumentParser, error: object) -> int:
    """Print `prog: error: message` as one line on stderr; returns the exit code 2."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        error = f"{error.filename}: {error.strerror}"
    print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2
