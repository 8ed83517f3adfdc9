"""Command line: ``diffrl train``, ``eval``, ``sample``, ``label``, ``report`` and ``train-value``."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from pathlib import Path

import torch

from diffrl import rewards
from diffrl.config import MAX_SEED
from diffrl.errors import ConfigError
from diffrl.files import atomic_write_bytes, image_grid, save_png
from diffrl.types import SamplerSettings

GUIDANCE = ("none", "svdd-pm", "svdd-mc", "best-of-n", "smc")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
"""A ``section.key=value`` override (anything else among ``diffrl train``'s arguments is the CONFIG)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``diffrl sample: error: argument --M: ...``), status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float | None = None, high: float | None = None, *, high_open: bool = False):
    """An argparse ``type``: ``kind`` (int or float) parsed from the text, finite and in
    ``[low, high]`` (``[low, high)`` with ``high_open``), else a one-line error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        inside = math.isfinite(value) and (low is None or value >= low)
        inside = inside and (high is None or (value < high if high_open else value <= high))
        if not inside:
            lo = "-inf" if low is None else low
            hi = "inf)" if high is None else f"{high})" if high_open else f"{high}]"
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT, STEPS = number(int, 1), number(int, 1, 1000)
SEED, GUIDANCE_SCALE, ETA = (
    number(int, 0, MAX_SEED, high_open=True),
    number(float, 0, 100),
    number(float, 0, 1),
)


def _sample(args: argparse.Namespace) -> int:
    """``diffrl sample``: plain or reward-guided sampling; writes images, a grid and reward tables."""
    import csv
    import time

    from diffrl.evaluation import check_model, load_for_eval
    from diffrl.guidance import svdd
    from diffrl.guidance.value import load_value_net, value_net_value
    from diffrl.prompts import load_prompts
    from diffrl.runfolder import writable_folder

    if args.guidance in ("svdd-pm", "best-of-n", "smc") and not args.reward:
        raise ConfigError(f"--guidance {args.guidance} needs --reward")
    if args.guidance == "svdd-mc" and not args.value_net:
        raise ConfigError("--guidance svdd-mc needs --value-net FILE (made by diffrl train-value)")
    writable_folder(args.out, "--out")
    check_model(args.model)
    prompts = load_prompts(args.prompt if args.prompt else args.prompts).prompts
    prompts = [prompts[i % len(prompts)] for i in range(args.num_images or len(prompts))]
    reward_fn = rewards.get(args.reward) if args.reward else None
    value_net = load_value_net(args.value_net) if args.value_net else None
    pipe, _ = load_for_eval(args.model)
    settings = SamplerSettings(num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    if args.guidance == "none":  # plain sampling: SVDD with one candidate (DDIM or LCM policy)
        out = svdd.svdd(pipe, prompts, None, settings, num_candidates=1, generator=generator)
    elif args.guidance in ("svdd-pm", "svdd-mc"):
        value = (
            svdd.posterior_mean_value(reward_fn) if args.guidance == "svdd-pm" else value_net_value(value_net)
        )
        out = svdd.svdd(
            pipe,
            prompts,
            value,
            settings,
            num_candidates=args.M,
            alpha=args.alpha,
            resample_fraction=args.resample_fraction,
            generator=generator,
        )
    elif args.guidance == "best-of-n":
        out = svdd.best_of_n(pipe, prompts, reward_fn, settings, n=args.M, generator=generator)
    else:
        value = svdd.posterior_mean_value(reward_fn)
        out = svdd.smc(
            pipe, prompts, value, settings, num_particles=args.M, alpha=args.alpha or 0.1, generator=generator
        )
    images, calls = out.images, out.unet_calls
    seconds = time.perf_counter() - start
    values = (
        reward_fn(images, prompts, [{} for _ in prompts]).tolist() if reward_fn else [None] * len(prompts)
    )

    out_dir = Path(args.out)
    rows = []
    for i, (prompt, image, value) in enumerate(zip(prompts, images, values)):
        name = f"images/{i:04d}.png"
        save_png(
            image_grid(image[None], [""], columns=1, scale=1).crop((0, 0, *image.shape[:0:-1])),
            out_dir / name,
        )
        rows.append({"index": i, "prompt": prompt, "reward": value, "file": name})
    captions = [p if v is None else f"{p}\nreward {v:.3f}" for p, v in zip(prompts, values)]
    save_png(image_grid(images, captions), out_dir / "grid.png")
    summary = {
        "guidance": args.guidance,
        "reward": args.reward,
        "M": args.M,
        "alpha": args.alpha,
        "unet_calls": calls,
        "seconds": seconds,
        "images": rows,
    }
    atomic_write_bytes(out_dir / "rewards.json", (json.dumps(summary, indent=1) + "\n").encode())
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["index", "prompt", "reward", "file"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "rewards.csv", table.getvalue().encode())
    scored = [v for v in values if v is not None]
    mean = f", mean {args.reward} {sum(scored) / len(scored):.4f}" if scored else ""
    print(
        f"{len(prompts)} images with --guidance {args.guidance} ({calls} UNet evaluations, {seconds:.1f}s){mean}; wrote {out_dir}"
    )
    return 0


def _train_value(args: argparse.Namespace) -> int:
    """``diffrl train-value``: fit SVDD-MC's value network on rollouts of a pipeline."""
    from diffrl.evaluation import check_model, load_for_eval
    from diffrl.guidance import value
    from diffrl.prompts import load_prompts
    from diffrl.runfolder import writable_file

    writable_file(args.out, "--out")
    check_model(args.model)
    source = load_prompts(args.prompts)
    reward_fn = rewards.get(args.reward)
    pipe, _ = load_for_eval(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    chunks = []
    for start in range(0, args.num_rollouts, args.batch_size):
        prompts = source.sample(min(args.batch_size, args.num_rollouts - start), generator)
        chunks.append(
            value.value_targets(
                pipe,
                prompts,
                reward_fn,
                SamplerSettings(num_steps=args.num_steps, guidance_scale=args.guidance_scale),
                generator=generator,
            )
        )
    data = [torch.cat(parts) for parts in zip(*chunks)]
    net = value.train_value_net(data, epochs=args.epochs, seed=args.seed)
    value.save_value_net(net, args.out)
    with torch.no_grad():
        mse = (net(*data[:3]) - data[3]).pow(2).mean().item()
    print(
        f"value net on {len(data[3])} states: train MSE {mse:.4g} (reward variance {data[3].var().item():.4g}); wrote {args.out}"
    )
    return 0


TRAIN_HELP = """\
Fine-tune a diffusion model with RL as described by a YAML config.

CONFIG is a YAML file with the sections model, sample, train, stat_tracking, reward, prompts and
run, plus b2diffurl, d3po or dpo for those algorithms (see configs/ for complete examples; every
key has a default; algorithm: rlcm (for a latent consistency model), d3po, dpo and seppo fill
the keys a config leaves unset with their papers' defaults).
Any key can be overridden after the file as section.key=value, the value parsed as YAML 1.2 (so
"no" stays a string):

  diffrl train configs/ddpo/tiny_compressibility.yaml train.learning_rate=1e-4 run.num_epochs=10
  diffrl train configs/ddpo/sd15_aesthetic.yaml "prompts.source=[a cat, a dog]"

Unknown keys, wrong types and out-of-range values are reported before any model loads.
The run folder (run.output_dir/run.name) receives config.yaml, metrics.jsonl, samples/,
reward_curve.png, report.html (diffrl report RUN_DIR rewrites it), checkpoints/ and lora/.
A folder that already holds a run is refused unless --resume, --new-name (a free NAME-2, ...)
or run.overwrite=true (deletes it). --resume RUN_DIR_OR_CHECKPOINT continues a run at the
epoch after its newest checkpoint that verifies (with the run's own config.yaml when CONFIG is
omitted); it may change only epochs, checkpointing, learning rate, trackers, reward timeouts and
speed levers (recorded in RUN_DIR/resumes.jsonl), never the model, algorithm or shapes.
Ctrl-C or SIGTERM finishes the current epoch, saves a checkpoint and exits (a second one stops at
once). Errors and faults: docs/errors.md.
Multi-process: accelerate launch scripts/train.py CONFIG [key=value ...]
"""


def _train(args: argparse.Namespace) -> int:
    config = resolve_train_config(args.config, args.overrides, args.resume, new_name=args.new_name)
    if args.print_config:
        from diffrl.config import annotated

        print(annotated(config), end="")
        return 0
    from diffrl.trainer import train

    train(config)
    return 0


def resolve_train_config(
    config_path: str | None, overrides: list[str], resume: str | None, *, new_name: bool = False
):
    """The config of ``diffrl train``: the file (or, resuming without one, the run's own
    config.yaml with the changes its earlier resumes recorded), the overrides, and
    ``run.resume_from`` when resuming; with ``new_name``, ``run.name`` becomes the first free
    ``NAME-k``."""
    from diffrl.checkpoints import resolve_resume
    from diffrl.config import load_config
    from diffrl.runfolder import free_name, recorded_overrides

    items = ([config_path] if config_path is not None else []) + list(overrides)
    files = [item for item in items if not OVERRIDE.match(item)]
    if len(files) > 1:
        raise ConfigError(
            f"diffrl train takes one CONFIG file, got {', '.join(files)} (overrides look like section.key=value)"
        )
    config_path = files[0] if files else None
    overrides = [item for item in items if OVERRIDE.match(item)]
    if resume is not None:
        if new_name:
            raise ConfigError("--new-name starts a new run; it cannot be combined with --resume")
        run_dir, _ = resolve_resume(resume)
        if config_path is None:
            config_path = str(run_dir / "config.yaml")
            overrides = recorded_overrides(run_dir) + overrides
        overrides.append(f"run.resume_from={json.dumps(str(resume))}")
    if config_path is None:
        raise ConfigError("diffrl train needs a CONFIG file (or --resume RUN_DIR)")
    config = load_config(config_path, overrides)
    if new_name:
        name = free_name(config.run.output_dir, config.run.name)
        config = load_config(config_path, [*overrides, f"run.name={json.dumps(name)}"])
    return config


def _eval_settings(args: argparse.Namespace, run_config) -> SamplerSettings:
    """``diffrl eval``'s sampler: the arguments given, else the run's, else 20 steps, guidance 5, eta 1."""
    sample = run_config.sample if run_config is not None else None

    def pick(value, key: str, default):
        return value if value is not None else (getattr(sample, key) if sample else default)

    return SamplerSettings(
        num_steps=pick(args.num_steps, "num_steps", 20),
        guidance_scale=pick(args.guidance_scale, "guidance_scale", 5.0),
        eta=pick(args.eta, "eta", 1.0),
    )


def _eval(args: argparse.Namespace) -> int:
    """``diffrl eval``: a reward on a prompt set, or a GenEval suite (``--suite``), per model."""
    from diffrl import geneval
    from diffrl.evaluation import (
        check_model,
        evaluate,
        evaluate_suite,
        load_for_eval,
        load_suite,
        markdown_table,
        suite_detector,
    )
    from diffrl.prompts import load_prompts
    from diffrl.runfolder import writable_file

    if not args.suite and not (args.prompts and args.reward):
        raise ConfigError("diffrl eval needs --prompts and --reward (or --suite toy-geneval|FILE.jsonl)")
    if args.json:
        writable_file(args.json, "--json")
    for model in args.models:
        check_model(model)
    if args.suite:
        rows = load_suite(args.suite)
        detector, thresholds = suite_detector(args.detector)
    else:
        source, reward_fn = load_prompts(args.prompts), rewards.get(args.reward)
    results = {}
    for model in args.models:
        pipe, run_config = load_for_eval(model)
        settings = _eval_settings(args, run_config)
        if args.suite:
            results[model] = evaluate_suite(
                pipe, rows, detector, thresholds, settings,
                images_per_prompt=args.images_per_prompt, seed=args.seed,
            )  # fmt: skip
        else:
            results[model] = evaluate(
                pipe, source.prompts, reward_fn, num_images=args.num_images, num_steps=settings.num_steps,
                guidance_scale=settings.guidance_scale, eta=settings.eta, seed=args.seed,
            )  # fmt: skip
    print(geneval.markdown(results) if args.suite else markdown_table(results))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
    return 0


def _listen(make, args: argparse.Namespace):
    """``make()`` (a server bound to ``--host``/``--port``), its bind failure as one ConfigError line."""
    try:
        return make()
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ConfigError(
            f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror or err}); "
            "pick another --port (0 picks a free one)"
        ) from err


def _serve_until_interrupted(server) -> int:
    """Serve until Ctrl-C, then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _label(args: argparse.Namespace) -> int:
    from diffrl.labeling import is_loopback, label_state, make_server, page_url

    server = _listen(lambda: make_server(args.run_dir, args.host, args.port), args)
    state = label_state(server.run_dir)
    if not is_loopback(args.host):
        print(
            f"diffrl label: WARNING: listening on {args.host}, which other machines can reach; anyone who "
            "has the URL below (it holds the access token) can see the images and write labels",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"diffrl label: {page_url(server)} ({state['labeled']} of {state['total']} groups labeled); "
        "Ctrl-C stops (every choice is already saved)",
        flush=True,
    )
    return _serve_until_interrupted(server)


def _serve_reward(args: argparse.Namespace) -> int:
    """``diffrl serve-reward NAME [key=value ...]``: one registered reward over HTTP until Ctrl-C."""
    import yaml

    from diffrl.rewards.remote import make_server

    kwargs = {}
    for item in args.kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"serve-reward: {item!r} is not key=value (a keyword argument of the reward)")
        kwargs[key] = yaml.safe_load(value)
    if args.name == "remote":
        raise ConfigError("serve-reward: 'remote' is the client of a served reward; serve the reward itself")
    reward_fn = rewards.get(args.name, **kwargs)  # built (and its weights loaded) before listening
    server = _listen(lambda: make_server(reward_fn, args.name, args.host, args.port, args.token), args)
    host, port = server.server_address[:2]
    print(f"diffrl serve-reward: {args.name} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    return _serve_until_interrupted(server)


def _report(args: argparse.Namespace) -> int:
    from diffrl.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    print(write_report(run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="diffrl", description="RL fine-tuning and reward-guided sampling for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune with RL from a YAML config",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument(
        "overrides", nargs="*", help="section.key=value overrides (before or after the options)"
    )
    train.add_argument(
        "--new-name",
        action="store_true",
        help="if run.name's folder already holds a run, use the first free NAME-2, NAME-3, ... instead",
    )
    train.add_argument(
        "--resume", metavar="PATH", help="run folder (its newest checkpoint) or checkpoint folder"
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, each value marked with where it came from, and exit",
    )
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="score pipelines or trained runs on a fixed seeded prompt set")
    ev.add_argument("models", nargs="+", metavar="PIPELINE_OR_RUN", help="model name/path or run folder")
    ev.add_argument("--prompts", help="prompt set name, text file, or toy_heldout_single etc.")
    ev.add_argument("--reward", help="reward name or package.module:function")
    ev.add_argument(
        "--suite",
        help="GenEval instead of a reward: toy-geneval (the toy world's held-out rows) or a GenEval-layout JSONL",
    )
    ev.add_argument(
        "--detector",
        choices=("toy", "owlv2"),
        default="toy",
        help="with --suite: the toy world's detector, or OWLv2 + CLIP colours for real images",
    )
    ev.add_argument("--images-per-prompt", type=COUNT, default=4, help="with --suite (GenEval: 4)")
    ev.add_argument("--num-images", type=COUNT, default=64)
    ev.add_argument("--num-steps", type=STEPS, default=None, help="default: the run's, else 20")
    ev.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=None, help="default: the run's, else 5")
    ev.add_argument("--eta", type=ETA, default=None, help="default: the run's, else 1")
    ev.add_argument("--seed", type=SEED, default=0)
    ev.add_argument("--json", default=None, help="also write the results here")
    ev.set_defaults(func=_eval)

    sample = sub.add_parser(
        "sample",
        help="sample images, plain or steered toward a reward (SVDD, best-of-N, SMC), and score them",
        description="Defaults follow the SVDD paper: M=20 candidates, alpha=0 (argmax), 50 DDIM steps, eta 1, guidance 7.5.",
    )
    sample.add_argument(
        "model", metavar="PIPELINE_OR_RUN", help="built-in name, diffusers folder, hub id or run folder"
    )
    sample.add_argument("--prompts", default="toy_heldout_single", help="prompt set name or text file")
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable; replaces --prompts)")
    sample.add_argument("--num-images", type=COUNT, default=None, help="default: one per prompt")
    sample.add_argument("--guidance", choices=GUIDANCE, default="none")
    sample.add_argument("--reward", default=None, help="reward name or package.module:function")
    sample.add_argument("--value-net", default=None, help="SVDD-MC value network (diffrl train-value)")
    sample.add_argument(
        "--M", type=COUNT, default=20, help="candidates (SVDD), particles (SMC) or N (best-of-N)"
    )
    sample.add_argument(
        "--alpha", type=number(float, 0), default=0.0, help="temperature; 0 = argmax (SMC: default 0.1)"
    )
    sample.add_argument(
        "--resample-fraction",
        type=number(float, 0, 1, high_open=True),
        default=0.0,
        help="SVDD-R: worst fraction replaced",
    )
    sample.add_argument("--num-steps", type=STEPS, default=50)
    sample.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=7.5)
    sample.add_argument("--eta", type=ETA, default=1.0)
    sample.add_argument("--seed", type=SEED, default=0)
    sample.add_argument("--out", default="samples", help="output folder")
    sample.set_defaults(func=_sample)

    label = sub.add_parser(
        "label",
        help="serve a local page to label a D3PO run's saved rollouts (d3po.preferences: human)",
        description="Pick the best and the worst image of each saved rollout group (mouse or number keys; "
        "T = tie). Labels are appended to RUN_DIR/rollouts/epoch_*/rank_*/labels.jsonl as they are made.",
    )
    label.add_argument("run_dir", metavar="RUN_DIR")
    label.add_argument("--port", type=number(int, 0, 65535), default=8765, help="0 picks a free port")
    label.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    label.set_defaults(func=_label)

    serve = sub.add_parser(
        "serve-reward",
        help="serve a registered reward over HTTP for runs with reward.name: remote",
        description="Serve one reward (built-in name or package.module:function, with its keyword "
        "arguments as key=value) on http://HOST:PORT: GET /health, POST /score (npz images + JSON). "
        "Several runs may share it; requests are scored one batch at a time.",
    )
    serve.add_argument("name", metavar="NAME")
    serve.add_argument(
        "kwargs", nargs="*", metavar="key=value", help="keyword arguments of the reward (YAML values)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=number(int, 0, 65535), default=18085, help="0 picks a free port")
    serve.add_argument(
        "--token", default=None, help="bearer token clients must send (required beyond loopback)"
    )
    serve.set_defaults(func=_serve_reward)

    report = sub.add_parser(
        "report", help="(re)write RUN_DIR/report.html: curves, fixed-seed sample grids, config"
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=_report)

    value = sub.add_parser("train-value", help="fit SVDD-MC's value network on rollouts of a pipeline")
    value.add_argument("model", metavar="PIPELINE_OR_RUN")
    value.add_argument("--prompts", required=True)
    value.add_argument("--reward", required=True)
    value.add_argument("--num-rollouts", type=COUNT, default=512)
    value.add_argument("--batch-size", type=COUNT, default=32)
    value.add_argument("--num-steps", type=STEPS, default=50)
    value.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=7.5)
    value.add_argument("--epochs", type=COUNT, default=20)
    value.add_argument("--seed", type=SEED, default=0)
    value.add_argument("--out", default="value.safetensors")
    value.set_defaults(func=_train_value)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors in the user's input print one line and return 2, a run stopped by a
    signal returns 128 + the signal number, a D3PO run waiting for human labels returns 3."""
    from diffrl.errors import AwaitingLabels, DiffrlError, RunStopped

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(not OVERRIDE.match(item) for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.func(args)
    except (DiffrlError, FileNotFoundError) as err:
        print(f"diffrl: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"diffrl: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except AwaitingLabels as waiting:
        print(f"diffrl: {waiting}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
