"""``meshlm generate | serve | bench | plan``.

Engine flags (--model, --tp, --pp, --ep, --dtype, ...) come from EngineArgs; sampling flags
from SamplingParams. A plain process asked for several ranks relaunches itself under mpiexec.
"""
from __future__ import annotations

import argparse
import sys

from meshlm.config import EngineArgs, EngineConfig
from meshlm.sampling_params import SamplingParams


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy (default: 0; the API's default is 1.0)")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--min-p", type=float, default=d.min_p)
    parser.add_argument("--seed", type=int, default=None, dest="sample_seed",
                        help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, min_p=ns.min_p, seed=ns.sample_seed, stop=ns.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch); with "
                     "--skip-tokenizer-init, token ids such as \"1, 2, 3\"")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="apply the chat template (default: when the model has one)")
    gen.add_argument("--system", default=None, help="system message when --chat")
    _add_sampling_args(gen)
    EngineArgs.add_cli_args(gen)
    _add_serve_parser(sub)
    _add_bench_parser(sub)
    _add_plan_parser(sub)
    return parser


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="each rank's memory for a layout, from config.json (no GPU, no weights)")
    plan.add_argument("--gpu-memory-gb", type=float, default=None,
                      help="memory of one GPU in GiB (default: the local GPU's)")
    EngineArgs.add_cli_args(plan)


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (on rank 0)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: no key)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in the API (default: the repo id of a Hub model, else the model "
                            "directory's name)")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    from meshlm.server.limits import ServerLimits
    ServerLimits.add_cli_args(serve)
    from meshlm.server.tools import ToolOptions
    ToolOptions.add_cli_args(serve)
    EngineArgs.add_cli_args(serve)


def _add_bench_parser(sub) -> None:
    from meshlm.bench.cli_args import add_serve_args, add_throughput_args
    bench = sub.add_parser("bench", help="benchmark throughput and latency")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    offline = kinds.add_parser("throughput", help="offline: drive the engine in this process")
    EngineArgs.add_cli_args(offline)
    add_throughput_args(offline)
    serving = kinds.add_parser("serve", help="load-test an OpenAI-compatible server over HTTP")
    add_serve_args(serving)


def relaunch_if_needed(args: EngineArgs, extra_argv: tuple[str, ...] = ()) -> None:
    """A plain process asked for several ranks re-executes itself under mpiexec, with ``extra_argv``.

    The model is resolved (fetched if needed) here, once; the ranks get its directory.
    """
    from meshlm.launcher.world import launched_by_mpi, relaunch_under_mpiexec
    from meshlm.weights.hub import hub_repo_id
    if args.world_size > 1 and not launched_by_mpi():
        config = EngineConfig.from_args(args)  # fetch the model once and check the layout, before the ranks start
        if args.model is None or hub_repo_id(args.model) is not None:
            sys.argv += ["--model", str(config.model_dir)]  # argparse keeps the last --model
        sys.argv += extra_argv
        relaunch_under_mpiexec(args.world_size)


def cmd_generate(ns: argparse.Namespace) -> int:
    from meshlm.api.llm import LLM
    args = EngineArgs.from_cli(ns)
    # With no tokenizer, prompts are token ids: bad ones fail here, before any rank starts.
    token_prompts = [token_ids_of(text) for text in ns.prompts] if args.skip_tokenizer_init else None
    relaunch_if_needed(args)
    params = _sampling_params(ns)
    # Only rank 0 returns from LLM(...); the other ranks serve steps inside it, then exit.
    llm = LLM(**{k: getattr(args, k) for k in args.__slots__})
    try:
        prompts = token_prompts or [_prompt(llm.tokenizer, text, ns) for text in ns.prompts]
        show = _token_ids_text if token_prompts else (lambda c: c.text)
        if len(prompts) == 1:
            for delta in llm.generate_stream(prompts[0], params, output_kind="delta"):
                sys.stdout.write("".join(show(c) for c in delta.outputs))
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for text, out in zip(ns.prompts, llm.generate(prompts, params)):
                print(f"### {text}\n{show(out.outputs[0])}\n")
    finally:
        llm.shutdown()
    return 0


def token_ids_of(text: str) -> list[int]:
    """A prompt written as token ids, separated by commas or spaces: ``"1, 2, 3"`` or ``"1 2 3"``."""
    words = text.replace(",", " ").split()
    if not words or not all(w.isdecimal() for w in words):
        raise ValueError(f"prompt {text!r}: with --skip-tokenizer-init there is no tokenizer, so a prompt "
                         f"must be token ids separated by commas or spaces, such as \"1, 2, 3\"")
    return [int(w) for w in words]


def _token_ids_text(completion) -> str:
    """A completion's new token ids, each followed by a space (streamed pieces join into one line)."""
    return "".join(f"{t} " for t in completion.token_ids)


def _prompt(tokenizer, text: str, ns: argparse.Namespace) -> str | list[int]:
    """The text itself, or its chat-templated token ids (with ``--system``) when chat is on."""
    use_chat = tokenizer.has_chat_template if ns.chat is None else ns.chat
    if not use_chat:
        return text
    messages = ([{"role": "system", "content": ns.system}] if ns.system else [])
    messages.append({"role": "user", "content": text})
    return tokenizer.encode_chat(messages)


def cmd_serve(ns: argparse.Namespace) -> int:
    from meshlm.server.launch import run_server
    from meshlm.weights.hub import hub_repo_id
    args = EngineArgs.from_cli(ns)
    # Relaunched ranks get the model's directory: a repo id stays the served name (vLLM's default).
    repo_id = None if ns.served_model_name else hub_repo_id(args.model)
    relaunch_if_needed(args, ("--served-model-name", repo_id) if repo_id else ())
    # Only rank 0 returns, after SIGINT/SIGTERM; the other ranks exit when it shuts down.
    from meshlm.server.limits import ServerLimits
    from meshlm.server.tools import ToolOptions
    limits = ServerLimits.from_cli(ns)  # bad flags fail here, before any rank starts
    tool_options = ToolOptions.from_cli(ns)
    run_server(args, ns.host, ns.port, ns.api_key, ns.served_model_name, ns.uvicorn_log_level, limits,
               tool_options)
    return 0


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from meshlm.bench.cli_args import throughput_options
    from meshlm.bench.throughput import run_throughput
    opts = throughput_options(ns)  # bad flags fail here, before any rank starts
    args = EngineArgs.from_cli(ns)
    relaunch_if_needed(args)
    run_throughput(args, opts)  # only rank 0 returns; the other ranks exit inside
    return 0


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    from meshlm.bench.cli_args import serve_options
    from meshlm.bench.serve import run_serve_benchmark
    run_serve_benchmark(serve_options(ns))
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from meshlm.api.plan import run_plan
    run_plan(EngineArgs.from_cli(ns), ns.gpu_memory_gb)  # never relaunches: a dry run in this process
    return 0


def main(argv: list[str] | None = None) -> int:
    from meshlm.launcher.logging import setup_logging
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging()
    try:
        if ns.command == "generate":
            return cmd_generate(ns)
        if ns.command == "serve":
            return cmd_serve(ns)
        if ns.command == "plan":
            return cmd_plan(ns)
        if ns.command == "bench":
            return {"throughput": cmd_bench_throughput, "serve": cmd_bench_serve}[ns.bench_command](ns)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        from meshlm.launcher.world import end_job_after_error
        print(f"meshlm: error: {exc}", file=sys.stderr)
        end_job_after_error(2)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
