"""The `cllmd` command: the daemon (`serve`) and offline tools (train, generate, tokenize, ...).

One table of subcommands; each command's run() returns an exit code, and errors become exit
codes in one place (main): 0 ok, 1 failure, 2 bad arguments or unreadable input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from cllm.catalogue import INFERENCE_WEIGHTS, default_of
from cllmd import __version__

log = logging.getLogger("cllmd")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or unreadable input: one clear line, exit code 2."""


# ---- shared helpers ------------------------------------------------------------------------------


def _bounded(convert, minimum, what: str):
    """An argparse type: convert the text, refuse it below minimum (and NaN or infinity)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= minimum or math.isinf(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _bounded(int, 1, "a positive integer")
_nonneg_int = _bounded(int, 0, "an integer >= 0")
_nonneg_float = _bounded(float, 0.0, "a finite number >= 0")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _load_model(path: str):
    from cllmd.model import Model
    from cllmd.modelfile import ModelFileError
    from cllmd.tokenizer import TokenizerError
    try:
        return Model.load(path)
    except FileNotFoundError:
        raise UsageError(f"no such model file: {path}") from None
    except (ModelFileError, TokenizerError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def _is_tty() -> bool:
    return sys.stderr.isatty()


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---- train ---------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from cllmd.settings import add_offline_arguments
    add_offline_arguments(p, "model")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from cllmd.settings import add_offline_arguments
    from cllmd.trainer import TrainConfig
    add_offline_arguments(p, "train", defaults={
        "decay_end_step": "--steps: the decay spans the run",
        "min_lr": "0.0001, or --lr when that is lower",
        "threads": "the usable cores"})
    own = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # offline-only settings
    g = p.add_argument_group("offline training")
    g.add_argument("--steps", type=_nonneg_int, default=2000, help="optimizer steps (default 2000)")
    g.add_argument("--accum-steps", type=_positive_int, default=own["accum_steps"],
                   help=f"micro-steps per optimizer step (default {own['accum_steps']})")
    g.add_argument("--eval-windows", type=_positive_int, default=own["eval_windows"],
                   help=f"validation windows per evaluation (default {own['eval_windows']})")
    g.add_argument("--val-fraction", type=_nonneg_float, default=0.1, help="last fraction of the tokens held out (default 0.1)")


def _build_tokenizer(args, files: list[Path]):
    from cllmd.tokenizer import BytesTokenizer, TokenizerError, train_bpe
    if args.tokenizer == "bytes":
        return BytesTokenizer()
    try:
        return train_bpe(files, args.vocab_size)
    except TokenizerError as e:
        raise UsageError(str(e)) from None


def _load_corpus(args):
    """(tokenizer, token array, description of the data) for --data or the default corpus."""
    import numpy as np
    if args.data:
        files = [Path(f) for f in args.data]
        texts = [_read_text(f) for f in files]
        what = ", ".join(str(f) for f in files)
    else:
        from cllmd.corpus import ensure_default_corpus
        files = ensure_default_corpus()
        texts = [f.read_text(encoding="utf-8") for f in files]
        what = f"the default corpus ({len(files)} files of Python standard library documentation)"
    tokenizer = _build_tokenizer(args, files)
    pieces = []
    for ids in tokenizer.encode_batch(texts):
        pieces += [ids.astype(np.uint32), np.array([tokenizer.eot_id], dtype=np.uint32)]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    return tokenizer, tokens, what


def _sphere_table(snap: dict) -> str:
    """A compact table of node zero and the 12 spheres."""
    lines = [f"step {snap['step']}: node zero, {snap['threads']} thread(s), batch {snap['batch_size']}, "
             f"{snap['tokens_per_second']:,.0f} tok/s",
             " sphere  state        batches    tokens  mean loss  busy%"]
    for s in snap["spheres"]:
        total = s["busy_s"] + s["idle_s"]
        busy = 100.0 * s["busy_s"] / total if total else 0.0
        loss = f"{s['mean_loss']:.4f}" if s["mean_loss"] is not None else "-"
        lines.append(f" {s['id']:>6}  {s['state']:<11} {s['batches']:>8} {s['tokens']:>9}  {loss:>9}  {busy:5.1f}")
    return "\n".join(lines) + "\n"


def cmd_train(args) -> int:
    import numpy as np
    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.launch import trainer_class
    from cllmd.trainer import TrainConfig
    Trainer = trainer_class()  # the DistributedTrainer under mpirun

    from cllmd.settings import offline_values
    if args.val_fraction >= 1:
        raise UsageError("--val-fraction must be below 1")
    values = offline_values(args, "train")
    values["decay_end_step"] = args.steps if values["decay_end_step"] is None else values["decay_end_step"]
    if values["min_lr"] is None:
        values["min_lr"] = min(default_of("train.min_lr"), values["lr"])
    threads = values.pop("threads") or None  # None (or 0): the usable cores
    try:
        train_cfg = TrainConfig(**values, accum_steps=args.accum_steps, eval_windows=args.eval_windows)
    except ValueError as e:
        raise UsageError(str(e)) from None

    t_load = time.perf_counter()
    tokenizer, tokens, what = _load_corpus(args)
    source = TokenArraySource(tokens, args.val_fraction)
    if not source.has_window(args.block_size):
        raise UsageError(f"not enough data: {len(tokens)} tokens for windows of {args.block_size + 1}")
    log.info("data: %s: %d tokens (%s tokenizer, vocabulary %d), prepared in %.1fs", what, len(tokens),
             tokenizer.kind, tokenizer.vocab_size, time.perf_counter() - t_load)

    if args.resume:
        from cllmd.modelfile import ModelFileError
        try:
            trainer = Trainer.from_checkpoint(args.resume, source, threads=threads)
        except FileNotFoundError:
            raise UsageError(f"no such checkpoint: {args.resume}") from None
        except (ModelFileError, ValueError) as e:  # ValueError: a precision this machine lacks
            raise UsageError(str(e)) from None
        model = trainer.model
        if model.cfg.vocab_size != tokenizer.vocab_size:
            raise UsageError(f"{args.resume}: vocabulary {model.cfg.vocab_size} differs from the data's {tokenizer.vocab_size}")
    else:
        try:
            cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd, block_size=args.block_size, init=args.init,
                              clock_positions=args.clock_positions)
        except ValueError as e:
            raise UsageError(str(e)) from None
        model = Model(cfg, seed=args.seed, tokenizer=tokenizer)
        try:
            trainer = Trainer(model, source, train_cfg, threads=threads)
        except ValueError as e:  # train.precision = bf16 where it cannot run
            raise UsageError(str(e)) from None
    log.info("model: %d layers, %d heads, width %d, context %d: %.2fM parameters; %d thread(s) for 12 spheres, "
             "%s products", model.cfg.n_layer, model.cfg.n_head, model.cfg.n_embd, model.cfg.block_size,
             model.num_params / 1e6, trainer.pool.size, trainer.precision)

    tty = _is_tty() and not args.quiet
    t0 = time.perf_counter()
    tokens_trained = 0
    train_loss = float("nan")
    history = []
    try:
        stop_at = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
        while trainer.step_num < stop_at:
            r = trainer.step()
            tokens_trained += r["tokens"]
            train_loss = r["loss"]
            done = trainer.step_num
            if args.eval_interval and done % args.eval_interval == 0 and done < args.steps:
                ev = trainer.evaluate()
                history.append({"step": done, "train_loss": train_loss, "val_loss": ev["val_loss"]})
                log.info("step %d: train loss %.4f, val loss %.4f (perplexity %.1f)", done, train_loss,
                         ev["val_loss"], ev["perplexity"])
            if args.spheres and done % args.spheres == 0:
                if tty:
                    sys.stderr.write("\n")
                sys.stderr.write(_sphere_table(trainer.snapshot()))
            if tty:
                elapsed = time.perf_counter() - t0
                rate = tokens_trained / elapsed if elapsed else 0.0
                eta = (args.steps - done) * elapsed / max(1, done - (trainer.step_num - done))
                sys.stderr.write(f"\rstep {done}/{args.steps}  loss {train_loss:.4f}  lr {r['lr']:.2e}  "
                                 f"{rate:,.0f} tok/s  ETA {_format_eta(eta)}   ")
                sys.stderr.flush()
    except KeyboardInterrupt:
        if tty:
            sys.stderr.write("\n")
        log.warning("interrupted at step %d: saving what was trained", trainer.step_num)
    seconds = time.perf_counter() - t0
    if tty:
        sys.stderr.write("\n")
    ev = trainer.evaluate()
    history.append({"step": trainer.step_num, "train_loss": train_loss, "val_loss": ev["val_loss"]})
    summary = {
        "steps": trainer.step_num, "train_loss": train_loss, "val_loss": ev["val_loss"],
        "perplexity": ev["perplexity"], "tokens": tokens_trained, "seconds": round(seconds, 3),
        "tokens_per_second": tokens_trained / seconds if seconds > 0 else 0.0,
        "skipped_steps": trainer.skipped_steps, "threads": trainer.pool.size, "precision": trainer.precision,
        "parameters": model.num_params, "out": str(args.out),
    }
    meta = {"trained_on": what, "train_summary": {k: v for k, v in summary.items() if k != "out"}}
    model.save(args.out, metadata=meta)
    if args.checkpoint:
        trainer.save_checkpoint(args.checkpoint)
    trainer.close()
    if args.json:
        print(json.dumps({**summary, "history": history}))
    else:
        print(f"trained {summary['steps']} steps on {tokens_trained:,} tokens in {seconds:.1f}s "
              f"({summary['tokens_per_second']:,.0f} tok/s): train loss {train_loss:.4f}, "
              f"val loss {ev['val_loss']:.4f}, perplexity {ev['perplexity']:.2f}; wrote {args.out}")
    return EXIT_OK


# ---- generate ------------------------------------------------------------------------------------


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The catalogue's sampling options as flags: the same as `cllm generate`'s."""
    from cllm.catalogue import add_sampling_arguments
    add_sampling_arguments(p.add_argument_group("sampling"))


def _sampling_options(args, model):
    """The flags given, then the model's own generation defaults, then the catalogue's."""
    from cllm.catalogue import sampling_from_args
    from cllmd.generate import SamplingOptions
    try:
        return SamplingOptions.from_args(sampling_from_args(args), model.metadata.get("generation_defaults"))
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_generate(args) -> int:
    from cllmd.generate import Generation, weights_problem
    problem = weights_problem(args.weights)
    if problem:
        raise UsageError(problem)
    model = _load_model(args.model)
    if model.tokenizer is None:
        raise UsageError(f"{args.model}: the model carries no tokenizer")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    opts = _sampling_options(args, model)
    gen = Generation(model, prompt, opts, weights=args.weights)
    pieces = []
    try:
        for piece in gen:
            if args.json:
                pieces.append(piece)
            else:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        gen.stats.stop_reason = "cancelled"
    s = gen.stats
    if args.json:
        print(json.dumps({"text": "".join(pieces), **s.to_dict()}))
    else:
        sys.stdout.write("\n")
        print(f"[{s.tokens_prompt} prompt + {s.tokens_generated} generated tokens, "
              f"{s.tokens_per_second:,.0f} tok/s, stop: {s.stop_reason}]", file=sys.stderr)
    return EXIT_OK


# ---- tokenizer tools -----------------------------------------------------------------------------


def cmd_tokenizer_train(args) -> int:
    from cllmd.tokenizer import TokenizerError, train_bpe
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise UsageError(f"no such file: {f}")
    try:
        tok = train_bpe(files, args.vocab_size)
    except TokenizerError as e:
        raise UsageError(str(e)) from None
    tok.save(args.out)
    if args.json:
        print(json.dumps({"out": str(args.out), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}))
    else:
        print(f"trained a byte-level BPE of {tok.vocab_size} tokens on {len(files)} file(s); wrote {args.out}")
    return EXIT_OK


def _tokenizer_for(args):
    from cllmd.tokenizer import BytesTokenizer, TokenizerError, load_tokenizer
    if args.model:
        model = _load_model(args.model)
        if model.tokenizer is None:
            raise UsageError(f"{args.model}: the model carries no tokenizer")
        return model.tokenizer
    if args.tokenizer_file:
        try:
            return load_tokenizer(args.tokenizer_file)
        except (TokenizerError, OSError) as e:
            raise UsageError(str(e)) from None
    return BytesTokenizer()


def cmd_tokenize(args) -> int:
    from cllmd.tokenizer import TokenizerError
    tok = _tokenizer_for(args)
    text = args.text if args.text is not None else sys.stdin.read()
    try:
        ids = [int(i) for i in tok.encode(text)]
    except TokenizerError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"count": len(ids), "ids": ids, "characters": len(text), "bytes": len(text.encode("utf-8"))}))
    else:
        print(" ".join(map(str, ids)))
        print(f"{len(ids)} tokens for {len(text)} characters", file=sys.stderr)
    return EXIT_OK


def cmd_inspect(args) -> int:
    from cllmd.modelfile import ModelFileError, read_model_file
    try:
        header, tensors = read_model_file(args.model)
    except FileNotFoundError:
        raise UsageError(f"no such model file: {args.model}") from None
    except ModelFileError as e:
        raise UsageError(str(e)) from None
    tok_json = header.get("tokenizer")
    tokenizer = None
    if tok_json:
        from cllmd.tokenizer import tokenizer_from_json
        t = tokenizer_from_json(tok_json)
        tokenizer = {"kind": t.kind, "vocab_size": t.vocab_size, "eot_id": t.eot_id}
    n_params = sum(int(a.size) for name, a in tensors.items() if not name.startswith("optim."))
    meta = header.get("metadata") or {}
    info = {"file": str(args.model), "format_version": header.get("format_version"), "config": header.get("config"),
            "parameters": n_params, "tensors": len(tensors), "tokenizer": tokenizer,
            "checkpoint": "checkpoint" in meta, "metadata": meta}
    if args.json:
        print(json.dumps(info, default=str))
        return EXIT_OK
    print(f"file        {info['file']}")
    print(f"parameters  {n_params:,} in {len(tensors)} tensors")
    for k, v in (info["config"] or {}).items():
        print(f"  {k:<16}{v}")
    print(f"tokenizer   {tokenizer['kind']} ({tokenizer['vocab_size']} symbols)" if tokenizer else "tokenizer   none")
    for k, v in meta.items():
        print(f"{k:<12}{json.dumps(v, default=str)}")
    return EXIT_OK


# ---- Hugging Face import and export ------------------------------------------------------------------


def cmd_import(args) -> int:
    from cllmd.hf import HFError, import_hf
    from cllmd.modelfile import ModelFileError
    t0 = time.perf_counter()
    try:
        summary = import_hf(args.src, args.out)
    except (HFError, ModelFileError) as e:
        raise UsageError(str(e)) from None
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(summary))
    else:
        c = summary["config"]
        print(f"imported {args.src}: {summary['parameters']:,} parameters ({c['n_layer']} layers, width "
              f"{c['n_embd']}, context {c['block_size']}, vocabulary {c['vocab_size']}), {summary['tokenizer']} "
              f"tokenizer of {summary['tokenizer_vocab_size']}; wrote {args.out} in {summary['seconds']:.1f}s")
    return EXIT_OK


def cmd_export(args) -> int:
    from cllmd.hf import HFError, export_hf
    from cllmd.modelfile import ModelFileError
    from cllmd.tokenizer import TokenizerError
    t0 = time.perf_counter()
    try:
        summary = export_hf(args.model, args.out_dir)
    except (HFError, ModelFileError, TokenizerError) as e:
        raise UsageError(str(e)) from None
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(summary))
    else:
        folded = "; clock positions folded into wpe" if summary["clock_positions_folded"] else ""
        print(f"exported {args.model}: {summary['parameters']:,} parameters to {args.out_dir} "
              f"(GPT2LMHeadModel, safetensors, {summary['tokenizer']} tokenizer as tokenizer.json){folded}")
    return EXIT_OK


# ---- the command table -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllmd", description="cllmd: a local, self-training language-model daemon.")
    parser.add_argument("--version", action="version", version=f"cllmd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("serve", help="run the daemon in the foreground (the default command); see cllmd serve --help",
                   add_help=False)

    p = sub.add_parser("train", help="train a model offline on files or the default corpus",
                       description="Train a model with the 12-sphere trainer and write a .cllm file.")
    p.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files (default: the built-in corpus)")
    _add_model_args(p)
    _add_train_args(p)
    p.add_argument("--out", default="model.cllm", help="output model file (default model.cllm)")
    p.add_argument("--checkpoint", metavar="FILE", help="also write a resumable checkpoint here")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from a checkpoint (its training settings apply; --steps is the new total)")
    p.add_argument("--stop-at", type=_nonneg_int, metavar="STEP",
                   help="stop at this step (the schedule still spans --steps); with --checkpoint, resumable")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--spheres", type=_nonneg_int, default=0, metavar="N",
                   help="print a table of the 12 spheres every N steps (0 = never)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("generate", help="generate text from a .cllm model",
                       description="Stream a continuation of PROMPT (or stdin) to stdout.")
    p.add_argument("model", help="a .cllm file")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _add_sampling_args(p)
    p.add_argument("--weights", choices=INFERENCE_WEIGHTS, default="float32",
                   help="multiply by float32 weights, int8 ones quantized at load, or bf16 ones "
                        "(needs cllmd[mkl]) (default float32)")
    p.add_argument("--json", action="store_true",
                   help="print the text and statistics (tokens_per_second, time_to_first_token, "
                        "prompt_tokens_per_second, ...) as JSON")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    tp = tsub.add_parser("train", help="train a byte-level BPE tokenizer", description="Train a byte-level BPE tokenizer.")
    tp.add_argument("files", nargs="+", help="UTF-8 text files")
    vocab = default_of("model.vocab_size")
    tp.add_argument("--vocab-size", type=_positive_int, default=vocab, help=f"vocabulary size (default {vocab})")
    tp.add_argument("--out", default="tokenizer.json", help="output file (default tokenizer.json)")
    tp.add_argument("--json", action="store_true", help="print a JSON summary")
    tp.set_defaults(run=cmd_tokenizer_train)

    p = sub.add_parser("tokenize", help="show token ids and counts", description="Tokenize TEXT (or stdin).")
    p.add_argument("text", nargs="?", help="the text (default: read stdin)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="use this .cllm model's tokenizer")
    src.add_argument("--tokenizer-file", help="use this tokenizer.json (default: the bytes tokenizer)")
    p.add_argument("--json", action="store_true", help="print ids and counts as JSON")
    p.set_defaults(run=cmd_tokenize)

    p = sub.add_parser("inspect", help="show a .cllm file's config, size, tokenizer and metadata",
                       description="Describe a .cllm model or checkpoint.")
    p.add_argument("model", help="a .cllm file")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("import", help="import a Hugging Face GPT-2 checkpoint directory as a .cllm file",
                       description="Import a GPT-2 family directory (config.json, model.safetensors or its "
                                   "shards, tokenizer.json or vocab.json + merges.txt, generation_config.json).")
    p.add_argument("src", help="the Hugging Face model directory")
    p.add_argument("out", help="the .cllm file to write")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("export", help="export a .cllm model as a Hugging Face GPT-2 directory",
                       description="Write config.json, model.safetensors, tokenizer.json and "
                                   "generation_config.json that transformers' GPT2LMHeadModel loads.")
    p.add_argument("model", help="a .cllm file")
    p.add_argument("out_dir", help="the directory to write (created if missing)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=cmd_export)

    return parser


def _start_mpi(argv: list[str]) -> int | None:
    """Under mpirun: MPI up on every rank; a rank > 0 becomes a sphere worker and returns its
    exit code here (rank 0 goes on as the command asked). None when not under MPI."""
    from cllmd.launch import launched
    launch = launched()
    if launch is None:
        return None
    try:
        from cllmd import distributed
    except ImportError as e:
        if launch.size == 1:
            return None  # one rank: the plain trainer is the same thing
        print(f"cllmd: started by mpirun as {launch.size} ranks, but {e.name or 'mpi4py'} is missing: "
              "pip install 'cllmd[mpi]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        distributed.timeout_from_env()
    except ValueError as e:
        if launch.rank == 0:  # every rank reads the same environment: all leave, one says why
            print(f"cllmd: {e}", file=sys.stderr)
        return EXIT_USAGE
    distributed.start()
    if launch.rank == 0:
        return None
    threads = None
    if argv and argv[0] == "train":
        from cllmd.settings import offline_values
        try:
            threads = offline_values(build_parser().parse_args(argv), "train").get("threads") or None
        except SystemExit:
            threads = None  # rank 0 reports the bad arguments and ends the job
    return distributed.run_worker(threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    code = _start_mpi(argv)
    if code is None:
        code = _run(argv)
    dist = sys.modules.get("cllmd.distributed")
    if dist is not None and dist.started():
        dist.finish(code)  # under mpirun: rank 0 stops the workers; MPI_Finalize, bounded
    return code


def _run(argv: list[str]) -> int:
    if not argv or argv[0] == "serve" or (argv[0].startswith("--") and argv[0] not in ("--help", "--version")):
        from cllmd.daemon import serve
        return serve(argv[1:] if argv and argv[0] == "serve" else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args)
    except UsageError as e:
        print(f"cllmd {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
