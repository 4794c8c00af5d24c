"""`seqserve serve`: the gRPC server and /metrics, configured by flags, `SEQSERVE_*` variables and a TOML file.

Without `--repository` (or `repository` in the config, or `SEQSERVE_REPOSITORY`) it serves `models/` in
the working directory, the repository `seqserve export RUN --repository models --name NAME` publishes to.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from server.config import ConfigError, ServerConfig, load_config

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def serve_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="seqserve serve",
        description="Serve the models of a repository over gRPC, with Prometheus /metrics. Settings: flags, "
                    "then SEQSERVE_<SETTING> environment variables, then the --config TOML file, then defaults.")
    parser.add_argument("--repository", help=f"model repository directory (default: {defaults.repository!r}, "
                                             "relative to the working directory)")
    parser.add_argument("--host", help=f"address to bind (default: {defaults.host})")
    parser.add_argument("--port", type=int, help=f"gRPC port, 0 = a free one (default: {defaults.port})")
    parser.add_argument("--metrics-port", type=int,
                        help=f"/metrics port, 0 = a free one, -1 = off (default: {defaults.metrics_port})")
    parser.add_argument("--config", help="TOML file of settings (default: $SEQSERVE_CONFIG)")
    parser.add_argument("--providers", help="ONNX Runtime execution providers, comma-separated, preferred first")
    parser.add_argument("--session-store",
                        help="where sessions live: memory, sqlite:PATH or redis://HOST:PORT[/DB] "
                             "(default: sqlite:state/sessions.db)")
    parser.add_argument("--api-processes", type=int,
                        help="gRPC front-end processes beside one engine process; 1 = one process for all "
                             "(default: chosen from the cores)")
    parser.add_argument("--log-format", choices=("json", "text"), help="log line format (default: json)")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    return parser


def serve_main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    try:
        config = load_config(args.config, repository=args.repository, host=args.host, port=args.port,
                             metrics_port=args.metrics_port, providers=args.providers, log_format=args.log_format,
                             session_store=args.session_store, api_processes=args.api_processes)
    except ConfigError as error:
        print(f"seqserve serve: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(config.to_toml(), end="")
        return 0

    from server.app import serve, setup_logging

    setup_logging(config.log_format, config.log_level)
    if not config.repository_path.is_dir():
        logging.getLogger("server.cli").error(
            "model repository %s does not exist; export a model with `seqserve export RUN --repository %s "
            "--name NAME` or pass --repository", config.repository_path, config.repository)
        return EXIT_CONFIG
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    except ConfigError as error:  # a TLS or token file that cannot be used
        logging.getLogger("server.cli").error("%s", error)
        return EXIT_CONFIG
    except Exception as error:  # startup failures (port in use, broken bundle): one log line
        logging.getLogger("server.cli").error("the server could not start: %s", error, exc_info=error)
        return EXIT_STARTUP


if __name__ == "__main__":
    raise SystemExit(serve_main(sys.argv[1:]))
