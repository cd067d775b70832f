"""The CLI's adapter, training and status commands.

Adapter commands work on the registry directly (the daemon notices every change within a request, since it
reads the registry's generation counter); ``train`` and ``status`` talk to the running daemon when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from solverx.config import Settings


def _registry(settings: Settings):
    from solverx.adapters.registry import Registry
    from solverx.paths import state_dirs

    return Registry(state_dirs(settings.home).adapters, max_adapter_bytes=settings.max_adapter_bytes)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _version_line(info) -> str:
    parent = f" parent={info.parent}" if info.parent else ""
    return f"  {info.model_name:<24} {info.status:<10} {info.stage:<8} rank={info.rank} base={info.base_id}{parent}"


def adapters_command(args: argparse.Namespace, settings: Settings) -> int:
    """``solverx adapters list|show|register|promote|rollback|remove``."""
    from solverx.adapters.names import parse_model_name

    registry = _registry(settings)
    action = args.adapters_action
    if action == "list":
        data = {name: [asdict(v) for v in registry.versions(name)] for name in registry.names()}
        if args.json:
            _print_json(data)
        elif not data:
            print("no adapters registered")
        for name in registry.names() if not args.json else ():
            print(name)
            for info in registry.versions(name):
                print(_version_line(info))
        return 0
    name, version = parse_model_name(args.name)
    if action == "export":
        return export_command(registry.resolve(name, version), args, settings)
    if action == "show":
        versions = [registry.resolve(name, version)] if version else registry.versions(name)
        if args.json:
            _print_json([asdict(v) for v in versions])
        else:
            for info in versions:
                print(_version_line(info))
                report = (info.eval_report or {}).get("rates")
                if report:
                    print(f"    eval: {json.dumps(report)}")
        return 0
    if action == "register":
        from solverx.paths import state_dirs

        known = registry.versions(name) if name in registry.names() else []
        # a new version of a known adapter goes on the base its versions are on; a new adapter on the default base
        base = args.base or (known[-1].base_id if known else settings.default_model or default_base_id(settings))
        info = registry.register(
            Path(args.path), name, base_id=base, base_dir=state_dirs(settings.home).model(base), promote=args.promote
        )
    elif action == "promote":
        info = registry.promote(name, version or args.version)
    elif action == "rollback":
        info = registry.rollback(name, args.version)
    elif action == "remove":
        registry.remove(name, version)
        print(f"removed {args.name}")
        return 0
    else:  # pragma: no cover - argparse restricts the choices
        raise AssertionError(action)
    _print_json(asdict(info)) if args.json else print(_version_line(info))
    return 0


def add_adapters_parser(commands, add_settings) -> None:
    parser = commands.add_parser("adapters", help="list, inspect, register, promote, roll back, remove adapters")
    actions = parser.add_subparsers(dest="adapters_action", required=True, metavar="ACTION")
    for action, help_text in (
        ("list", "every adapter and its versions"),
        ("show", "one adapter's versions, lineage and eval results (NAME or NAME@N)"),
        ("register", "register an adapter directory (adapter_config.json + adapters.safetensors) as a new version"),
        ("promote", "serve version N of NAME (NAME@N, or NAME --version N)"),
        ("rollback", "go back to the previously promoted version (or --version N)"),
        ("remove", "remove NAME (every version) or NAME@N"),
        ("export", "write NAME[@N] for llama.cpp/Ollama (gguf), Hugging Face PEFT (peft), or fused into its base"),
    ):
        sub = actions.add_parser(action, help=help_text)
        if action != "list":
            sub.add_argument("name")
        if action == "register":
            sub.add_argument("path", help="the adapter directory")
            sub.add_argument("--base", help="base model id (default: the default model)")
            sub.add_argument("--no-promote", dest="promote", action="store_false", help="keep it a candidate")
        if action in ("promote", "rollback"):
            sub.add_argument("--version", type=int)
        if action == "export":
            from solverx.adapters.export import FORMATS

            sub.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
            sub.add_argument("--out", required=True, type=Path, help="a new file (gguf) or directory (peft, fused)")
            sub.add_argument(
                "--base-model", help="peft: the Hugging Face id of the base, for adapter_config.json (default: its id)"
            )
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        add_settings(sub)


def add_facts_parser(commands, add_settings) -> None:
    parser = commands.add_parser("facts", help="what grounding retrieves for a question from NAME[@N]'s fact graph")
    parser.add_argument("name", help="NAME (its promoted version) or NAME@N")
    parser.add_argument("question")
    parser.add_argument("--top-k", type=int, help="how many facts (default: the version's recipe)")
    parser.add_argument("--json", action="store_true", help="machine-readable output, as the API answers")
    add_settings(parser)


def facts_command(args: argparse.Namespace, settings: Settings) -> int:
    """``solverx facts NAME[@N] "question"``: the facts, scores, entities and sources, best first."""
    from solverx.adapters.facts import FactsError, retrieve_for_version
    from solverx.adapters.names import parse_model_name

    name, version = parse_model_name(args.name)
    info = _registry(settings).resolve(name, version)
    try:
        facts = retrieve_for_version(info.path, info.recipe, args.question, args.top_k)
    except FactsError as exc:
        print(f"solverx: {info.model_name} has no fact graph ({exc})", file=sys.stderr)
        return 1
    if args.json:
        _print_json({"object": "list", "model": info.model_name, "data": [f.to_dict() for f in facts]})
    elif not facts:
        print(f"{info.model_name}: nothing retrieved (the question names none of its entities)")
    for fact in facts if not args.json else ():
        print(f"{fact.score:7.3f}  {fact.fact}\n         {', '.join(fact.entities)} — {fact.source}")
    return 0


def export_command(info, args: argparse.Namespace, settings: Settings) -> int:
    """``solverx adapters export``: one registered version, in another tool's format, at a new path."""
    from solverx.adapters import export
    from solverx.adapters.fingerprint import base_fingerprint
    from solverx.paths import state_dirs

    base_dir = state_dirs(settings.home).model(info.base_id)
    if not (base_dir / "config.json").is_file():
        raise export.ExportError(f"{info.model_name}'s base {info.base_id!r} is not installed in {base_dir.parent}")
    if base_fingerprint(base_dir) != info.base_fingerprint:
        raise export.ExportError(f"the base {info.base_id!r} changed since {info.model_name} was trained on it")
    out = args.out.expanduser().absolute()
    say = lambda message: print(f"solverx: {message}", file=sys.stderr)  # noqa: E731
    if args.export_format == "gguf":
        from solverx.models.gguf_import import GGUFSource

        written = export.export_gguf(info.path, base_dir, out)
        source = GGUFSource.of(base_dir)
        print(f"{written}\n  llama.cpp: llama-server -m {source.path} --lora {written}")
        print(f"  Ollama Modelfile: FROM {source.path}\n                    ADAPTER {written}")
    elif args.export_format == "peft":
        written = export.export_peft(info.path, base_dir, out, base_model=args.base_model or info.base_id)
        print(f"{written}\n  peft: PeftModel.from_pretrained(base, {str(written)!r})")
    else:
        written = export.export_fused(info.path, base_dir, out, progress=say)
        gguf = written / export.FUSED_GGUF
        print(f"{written}" + (f"\n  {gguf}: llama-server -m {gguf}" if gguf.is_file() else ""))
    return 0


def _daemon_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def _daemon(settings: Settings, method: str, path: str, **kwargs) -> Any | None:
    """A JSON answer from the running daemon, or None when none is listening."""
    import httpx

    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        response = httpx.request(method, _daemon_url(settings) + path, headers=headers, timeout=10, **kwargs)
    except httpx.TransportError:
        return None
    if response.status_code >= 400:
        message = response.json().get("error", {}).get("message", response.text)
        raise SystemExit(f"solverx: the daemon refused: {message}")
    return response.json()


def default_base_id(settings: Settings) -> str:
    """The daemon's default base: the first it serves (a directory is named after itself, as ``serve`` names it)."""
    first = settings.base_models[0]
    return Path(first).expanduser().name if Path(first).expanduser().is_dir() else first


def train_command(args: argparse.Namespace, settings: Settings) -> int:
    """Queue a run on the daemon, or with ``--now`` run it here, in the foreground, with a progress bar."""
    if args.check_hosts:
        return check_hosts_command(settings)
    if not args.adapter:
        print("solverx: name the adapter to train (its inbox folder), or pass --check-hosts", file=sys.stderr)
        return 2
    if not args.now:
        queued = _daemon(settings, "POST", "/v1/training", json={"adapter": args.adapter})
        if queued is None:
            print(
                f"solverx: no daemon at {_daemon_url(settings)}; run it here with: solverx train {args.adapter} --now"
            )
            return 1
        print(f"queued run {queued['run_id']}; follow it with: solverx status")
        return 0
    return _train_foreground(args.adapter, settings, no_replay=args.no_replay)


CHECK_HOSTS_TIMEOUT_S = 180  # the launcher's ssh has no timeout of its own


def check_hosts_command(settings: Settings) -> int:
    """Start the rank check on ``train_hosts`` the way a run starts (same launcher, backend, python, base path)."""
    import subprocess

    from solverx.paths import state_dirs

    hosts = settings.training_hosts()
    if hosts.world_size <= 1:
        print("train_hosts is not set: runs train in one process on this machine")
        return 0
    base_dir = state_dirs(settings.home).model(default_base_id(settings))
    command = hosts.command(["--base-dir", str(base_dir)], module="solverx.trainer.check_hosts")
    print(f"checking {hosts.world_size} ranks ({hosts.backend}): {', '.join(hosts.addresses())}", flush=True)
    try:
        done = subprocess.run(command, env=hosts.env(), timeout=CHECK_HOSTS_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"solverx: not every rank answered within {CHECK_HOSTS_TIMEOUT_S} s: is every host reachable "
              "by `ssh HOST` without a password, and its port open?")  # fmt: skip
        return 1
    if done.returncode not in (0, 1):
        print("solverx: a rank could not start; exit 255 is ssh's (host unreachable or asking for a password), "
              "127 a missing python at the same path")  # fmt: skip
    return 0 if done.returncode == 0 else 1


def _train_foreground(adapter: str, settings: Settings, no_replay: bool = False) -> int:
    """The same child process the daemon would start, its run log rendered as progress bars."""
    from tqdm import tqdm

    from solverx.paths import state_dirs
    from solverx.trainer.foreground import start_child

    dirs = state_dirs(settings.home)
    if not (dirs.inbox / adapter).is_dir():
        print(f"solverx: no inbox folder {dirs.inbox / adapter}: put knowledge files there first", file=sys.stderr)
        return 2
    run = start_child(
        dirs, adapter, replay=not no_replay, default_base=default_base_id(settings), hosts=settings.training_hosts()
    )
    run_id, run_dir = run.run_id, run.run_dir
    bar, finished = None, None
    try:
        for event in run.events():
            kind = event["event"]
            if kind == "ingested":
                print(event["report"])
            elif kind == "note" and event.get("stage") == "replay":
                print(event["message"])
            elif kind == "replay_progress":  # the base answering its replay questions, once per base
                if bar is None or bar.desc != "self replay":
                    bar = tqdm(total=event["total"], desc="self replay", unit="answer")
                bar.update(event["done"] - bar.n)
            elif kind == "stage":
                if bar is not None:
                    bar.close()
                bar = tqdm(total=event["iters"], desc=event["stage"], unit="step")
            elif kind == "progress" and bar is not None:
                bar.update(event["step"] - bar.n)
                bar.set_postfix(loss=f"{event['loss']:.3f}", tok_s=f"{event['tokens_per_second']:.0f}")
            elif kind == "warning":
                (bar.write if bar is not None else print)(f"warning: {event['message']}")
            elif kind == "evaluated":
                if bar is not None:
                    bar.close()
                print(f"eval: {json.dumps(event['scores'])}")
            elif kind == "finished":
                finished = event
    except KeyboardInterrupt:
        run.cancel()
        print("cancelled; the previous version keeps serving", file=sys.stderr)
        return 130
    if finished is None:
        print(f"solverx: training failed; see {run_dir / 'child.log'}", file=sys.stderr)
        return 1
    state = finished["state"]
    detail = finished.get("error") or "; ".join(finished.get("reasons", []))
    version = f" as {adapter}@{finished['version']}" if finished.get("version") else ""
    print(f"run {run_id}: {state}{version}{': ' + detail if detail else ''}")
    print(f"report: {run_dir / 'report.md'}")
    return 0 if state in ("succeeded", "rejected") else 1


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    """What the daemon serves and trains, or what is on disk when it is not running."""
    health = _daemon(settings, "GET", "/health")
    if health is None:
        print(f"daemon: not running at {_daemon_url(settings)}")
    else:
        print(f"daemon: running at {_daemon_url(settings)}, up {health.get('uptime_s', 0):.0f} s")
        print(f"  bases: {', '.join(health.get('models', []))}; running {health.get('running')}, "
              f"waiting {health.get('waiting')}")  # fmt: skip
    registry = _registry(settings)
    for name in registry.names():
        promoted = registry.promoted(name)
        print(f"adapter {name}: promoted {promoted.model_name if promoted else '(none)'}")
    training = _daemon(settings, "GET", "/v1/training") if health is not None else None
    runs = training["data"] if training else _local_runs(settings)
    for run in runs[:5]:
        progress = run.get("progress") or {}
        step = f" {progress.get('stage')} {progress.get('step')}/{progress.get('total')}" if progress else ""
        print(f"run {run['run_id']}: {run['state']}{step}{' — ' + run['error'] if run.get('error') else ''}")
    return 0


def _local_runs(settings: Settings) -> list[dict]:
    from solverx.paths import state_dirs
    from solverx.trainer.runlog import summarize

    runs = sorted((p for p in state_dirs(settings.home).runs.glob("*") if p.is_dir()), reverse=True)
    return [asdict(summarize(p)) for p in runs[:5]]


def prepare_command(args: argparse.Namespace, settings: Settings) -> int:
    """Extract (VLM → text), quantize and optionally register a checkpoint (or import a GGUF) as a base model."""
    from solverx.paths import state_dirs

    source = Path(args.checkpoint)
    is_gguf = source.suffix.lower() == ".gguf" and source.is_file()
    choice = args.q_bits or ("keep" if is_gguf else "8")
    if choice == "keep" and not is_gguf:
        print("solverx: --q-bits keep applies to a .gguf file only", file=sys.stderr)
        return 2
    q_bits = {"none": None, "keep": "keep"}[choice] if choice in ("none", "keep") else int(choice)
    out = Path(args.out) if args.out else None
    if args.register:
        out = state_dirs(settings.home).model(args.register)
    if out is None:
        print("solverx: give --out DIR or --register BASE_ID", file=sys.stderr)
        return 2
    if is_gguf:
        from solverx.models.gguf_import import GGUFImportError, import_gguf

        try:
            prepared = import_gguf(source, out, q_bits=q_bits, progress=True)
        except GGUFImportError as e:
            print(f"solverx: cannot import {source.name}: {e}", file=sys.stderr)
            return 2
    else:
        from solverx.models.prepare import prepare_checkpoint

        prepared = prepare_checkpoint(source, out, q_bits=q_bits, progress=True)
    kind = "text backbone extracted from a VLM, " if prepared.extracted_from_vlm else ""
    kind += "imported from GGUF, " if is_gguf else ""
    bits = f"{prepared.q_bits}-bit" if prepared.q_bits else "unquantized"
    print(f"prepared {prepared.model_type} ({kind}{bits}, {prepared.weight_bytes / 2**30:.1f} GiB) at {prepared.path}")
    print(f"fingerprint {prepared.fingerprint}; context limit {prepared.context_limit}")
    if args.register:
        print(f"registered as base model {args.register!r}: serve it with --base-models {args.register}")
    return 0


def plan_command(args: argparse.Namespace, settings: Settings) -> int:
    """Whether serving, training, or both at once fit this machine for a base model."""
    import os as _os

    from solverx.models.memory_plan import TrainPlanArgs, format_plan, load_model_config, plan, q_bits_of
    from solverx.paths import state_dirs

    path = Path(args.base)
    if not path.exists():
        path = state_dirs(settings.home).model(args.base)
    config = load_model_config(path)
    machine = (
        int(args.machine_gb * 2**30) if args.machine_gb else _os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_PHYS_PAGES")
    )
    q_bits = q_bits_of(config) if args.q_bits is None else (None if args.q_bits == "none" else int(args.q_bits))
    train = TrainPlanArgs(batch_size=args.batch_size, seq_len=args.seq_len) if args.train else None
    result = plan(
        config, q_bits=q_bits, context=args.context, resident_adapters=settings.max_resident_adapters,
        lora_rank=args.rank, lora_layers=args.layers, train=train, grad_checkpoint=args.grad_checkpoint,
        machine_bytes=machine,
    )  # fmt: skip
    print(format_plan(result))
    return 0


def add_model_parsers(commands, add_settings) -> None:
    prepare = commands.add_parser(
        "prepare", help="extract/quantize a checkpoint (HyperCLOVA X VLM, Gemma 2, llama…) or import a GGUF file"
    )
    prepare.add_argument("checkpoint", help="a Hugging Face checkpoint directory, or a llama.cpp .gguf file")
    prepare.add_argument("--out", help="where to write the prepared model")
    prepare.add_argument("--register", metavar="BASE_ID", help="write it into the state dir as this base model")
    prepare.add_argument(
        "--q-bits",
        choices=["8", "4", "none", "keep"],
        help="quantization (default: 8; for a .gguf, keep: Q4_0/Q4_1/Q8_0 stay as they are, the rest float32)",
    )
    add_settings(prepare)

    plan_parser = commands.add_parser("plan", help="will serving and training this base fit in memory?")
    plan_parser.add_argument("base", help="a base id, a model directory or a config.json")
    plan_parser.add_argument("--train", action="store_true", help="also plan a LoRA training run")
    plan_parser.add_argument("--context", type=int, default=4096, help="serving context (default: 4096)")
    plan_parser.add_argument("--q-bits", choices=["8", "4", "none"], help="override the model's quantization")
    plan_parser.add_argument("--batch-size", type=int, default=1, help="training batch size")
    plan_parser.add_argument("--seq-len", type=int, default=2048, help="training sequence length")
    plan_parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    plan_parser.add_argument("--layers", type=int, default=16, help="LoRA layers")
    plan_parser.add_argument("--grad-checkpoint", action="store_true")
    plan_parser.add_argument("--machine-gb", type=float, help="memory of the target machine (default: this one)")
    add_settings(plan_parser)
