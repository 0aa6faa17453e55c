"""The ``mmfree`` command line. Every command explains itself with ``--help``; bad input ends
with one sentence on stderr (exit status 1), never a traceback (set MMFREE_DEBUG=1 to get one)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["main"]


SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models/shipped/tiny-fortunes/tiny-fortunes.mmf"


class CliError(Exception):
    """A usage problem the user can fix; printed as one sentence."""


def _parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CliError(f"--tokens must be comma-separated integers like 1,5,9, not {text!r}") from None
    if not tokens:
        raise CliError("--tokens is empty; give at least one token id")
    return tokens


def _add_sampling(p: argparse.ArgumentParser):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (default)")
    g.add_argument("--temperature", type=float, metavar="T", help="sample from softmax(logits / T)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampler (default 0)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")


# --------------------------------------------------------------------------- commands

def cmd_convert(args) -> int:
    from mmfree.models.boardfile import write_board_model
    from mmfree.models.checkpoint import load_checkpoint
    from mmfree.models.quantized import quantize_model

    cfg, tensors = load_checkpoint(args.checkpoint)
    calib = None
    if args.calibration_text:
        calib = list(Path(args.calibration_text).read_bytes()[:1024])
    qm = quantize_model(cfg, tensors, res_frac=args.res_frac, lanes=args.lanes, calibration_tokens=calib,
                        name=args.name or Path(args.checkpoint).resolve().name,
                        source=str(args.checkpoint))
    out = write_board_model(qm, args.out)
    print(f"wrote {out} ({out.stat().st_size} bytes): d={cfg.d} layers={cfg.n_layers} "
          f"I={cfg.intermediate_size} V={cfg.vocab_size}, {cfg.ternary_weights()} ternary weights "
          f"in {qm.lanes}-lane words, residual fractional bits per stage {list(qm.res_fracs)}")
    return 0


def cmd_logits(args) -> int:
    tokens = _parse_tokens(args.tokens)
    if args.model:
        if args.integer:
            raise CliError("--integer goes with --checkpoint; a --model file is always run on the integer model")
        from mmfree.models.golden import IntegerModel
        model = IntegerModel.from_file(args.model)
        logits = model.dequantize(model.forward(tokens))
    else:
        from mmfree.models.checkpoint import load_checkpoint
        if args.integer:
            from mmfree.models.golden import IntegerModel
            from mmfree.models.quantized import quantize_model
            cfg, tensors = load_checkpoint(args.checkpoint)
            model = IntegerModel(quantize_model(cfg, tensors))
            logits = model.dequantize(model.forward(tokens))
        else:
            from mmfree.models.reference import FloatModel
            logits = FloatModel.from_checkpoint(args.checkpoint).forward(tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.asarray(logits, dtype=np.float32))
    print(f"wrote {out}: float32 logits [{len(tokens)}, {np.asarray(logits).shape[1]}]")
    return 0


def cmd_generate(args) -> int:
    from mmfree.models.golden import IntegerModel
    from mmfree.models.sampling import ByteDecoder, Sampler, encode_prompt, generate_tokens

    model = IntegerModel.from_file(args.model)
    prompt = encode_prompt(args.prompt, model.cfg.vocab_size)
    state = [model.new_state()]

    def step(token: int) -> np.ndarray:
        logits, state[0] = model.step(token, state[0])
        return model.dequantize(logits)

    decode = ByteDecoder()
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for token in generate_tokens(step, prompt, args.max_tokens, Sampler(args.temperature, args.seed)):
        out.write(decode(token))
        out.flush()
    out.write(decode.flush() + "\n")
    return 0


def _find_checkpoint(model_path: Path, recorded: str) -> Path:
    for candidate in (model_path.parent, Path(recorded) if recorded else None):
        if candidate is not None and (candidate / "config.json").exists():
            return candidate
    raise CliError(f"cannot find the float checkpoint of {model_path} (recorded source: "
                   f"{recorded or 'none'}); pass it with --checkpoint DIR")


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from mmfree.models.corpus import CORPUS_NAME, load_corpus
    from mmfree.models.fidelity import measure_fidelity
    from mmfree.models.golden import IntegerModel
    from mmfree.models.reference import FloatModel

    int_model = IntegerModel.from_file(args.model)
    ckpt = Path(args.checkpoint) if args.checkpoint else _find_checkpoint(Path(args.model), int_model.qm.source)
    float_model = FloatModel.from_checkpoint(ckpt)
    if float_model.cfg != int_model.cfg:
        raise CliError(f"checkpoint {ckpt} has a different configuration than {args.model}")
    data = Path(args.text).read_bytes() if args.text else load_corpus("val")
    source = args.text or f"{CORPUS_NAME}, held-out split"
    report = measure_fidelity(float_model, int_model, data, seq_len=args.seq_len, chunks=args.chunks,
                              progress=lambda it: tqdm(it, desc="eval", unit="chunk", leave=False,
                                                       disable=None))
    print(report.format(f"fidelity of {args.model} (integer) vs {ckpt} (float) on {source}"))
    return 0 if report.passed or not args.strict else 3


def _generate_on_board(url: str, args) -> int:
    """Load ``args.model`` into the board at ``url``, print the prompt and the generated text as
    it streams, then one line on stderr with the link's and the device's speed."""
    import time

    from mmfree.host.board import Board
    from mmfree.host.link import LinkError
    from mmfree.models.boardfile import read_board_model
    from mmfree.models.sampling import ByteDecoder, Sampler, encode_prompt

    if not args.timeout > 0:
        raise CliError(f"--timeout must be positive, not {args.timeout:g}")
    qm = read_board_model(args.model)
    prompt = encode_prompt(args.prompt, qm.cfg.vocab_size)
    sampler = Sampler(args.temperature, args.seed)
    out = sys.stdout
    try:
        with Board(url, baud=args.baud, timeout=args.timeout) as board:
            info = board.info()
            board.load(qm)
            board.reset_counters()
            decode = ByteDecoder()
            out.write(args.prompt)
            out.flush()
            t0, generated = time.perf_counter(), 0
            for token in board.generate(prompt, args.max_tokens, sampler):
                generated += 1
                out.write(decode(token))
                out.flush()
            out.write(decode.flush() + "\n")
            out.flush()
            elapsed = time.perf_counter() - t0
            totals = board.totals
    except LinkError as exc:
        raise CliError(str(exc)) from None
    line = (f"{len(prompt)} prompt + {generated} generated tokens in {elapsed:.2f} s: "
            f"{totals.tokens_per_second:.1f} tokens/s over the link")
    if totals.cycles:
        line += (f"; device: {totals.cycles_per_token:,.0f} cycles/token (ternary core busy "
                 f"{100 * totals.core_utilization:.0f}%), "
                 f"{totals.projected_tokens_per_second(info.clock_hz):,.1f} tokens/s at "
                 f"{info.clock_hz / 1e6:g} MHz")
    print(line, file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    return _generate_on_board(args.port, args)


def cmd_demo(args) -> int:
    from mmfree.firmware.isa import ICEBREAKER
    from mmfree.sim.board import SimBoard, SimBoardError, build

    try:
        built = build(ICEBREAKER, status=lambda text: print(f"[sim-board] {text}", file=sys.stderr))
        with SimBoard(built) as board:
            print(f"[sim-board] serving the accelerator at {board.url}; loading {args.model}",
                  file=sys.stderr)
            return _generate_on_board(board.url, args)
    except SimBoardError as exc:
        raise CliError(str(exc)) from None


def cmd_build(args) -> int:
    import dataclasses

    from mmfree.hdl.boards import get_board
    from mmfree.hdl.build import BuildError, build_bitstream, program_bitstream

    board = get_board(args.board)
    hw = board.hardware
    if args.lanes is not None:
        hw = dataclasses.replace(hw, lanes=args.lanes)
    if args.clock_mhz is not None:
        hw = dataclasses.replace(hw, clock_hz=round(args.clock_mhz * 1e6))
    try:
        report = build_bitstream(board, hw, args.out or Path("build") / board.name, seed=args.seed)
        print(report.text(), end="")
        if args.program:
            print(f"[build {board.name}] {board.programmer} {report.bin_path}", flush=True)
            program_bitstream(board, report.bin_path)
            print(f"[build {board.name}] the {board.name} runs the new bitstream")
    except BuildError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_sim_board(args) -> int:
    import dataclasses

    from mmfree.firmware.isa import ICEBREAKER
    from mmfree.sim.board import SimBoardError, serve

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be a TCP port number (0..65535; 0: any free port), not {args.port}")
    try:
        return serve(dataclasses.replace(ICEBREAKER, lanes=args.lanes), port=args.port, core=args.core)
    except SimBoardError as exc:
        raise CliError(str(exc)) from None


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from mmfree.firmware.isa import ICEBREAKER          # plain Python: the defaults come from it
    parser = argparse.ArgumentParser(
        prog="mmfree",
        description="MatMul-free language models on FPGAs: convert checkpoints to board model files, "
                    "run them on the bit-exact integer golden model, check their fidelity.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", help="Hugging Face checkpoint → board model file",
                       description="Quantize a Hugging Face hgrn_bit checkpoint directory into a board "
                                   "model file (.mmf): trits packed for the ternary core, fixed-point "
                                   "scales, norm weights, int8 embeddings and the sigmoid table.")
    p.add_argument("checkpoint", metavar="HF_DIR", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("out", metavar="OUT", help="board model file to write")
    p.add_argument("--lanes", type=int, default=ICEBREAKER.lanes, choices=(8, 16, 32, 64),
                   help=f"trits per weight word: the ternary core's lanes (default {ICEBREAKER.lanes}, "
                        f"the iCEBreaker bitstream's)")
    p.add_argument("--res-frac", type=int, metavar="F",
                   help="fractional bits of the int16 residual stream at every stage "
                        "(default: calibrated per stage)")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="text whose first 1024 bytes calibrate the residual format (default: built-in English)")
    p.add_argument("--name", help="model name stored in the file (default: the directory name)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("logits", help="logits after each of some tokens, as a .npy file",
                       description="Feed tokens one at a time from a zero state and save the logits "
                                   "after each as float32 [T, V]: float reference for --checkpoint, "
                                   "integer golden model (dequantized) for --model or --checkpoint --integer.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="HF_DIR", help="Hugging Face checkpoint directory")
    src.add_argument("--model", metavar="FILE", help="board model file")
    p.add_argument("--integer", action="store_true", help="with --checkpoint: quantize it and run the integer model")
    p.add_argument("--tokens", required=True, metavar="IDS", help="comma-separated token ids, e.g. 1,5,9")
    p.add_argument("--out", required=True, metavar="X.npy", help="output file")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("generate", help="generate text with the golden model on the CPU",
                       description="Generate text from a prompt with the bit-exact integer golden model "
                                   "of a board model file, on the CPU.")
    p.add_argument("--model", required=True, metavar="FILE", help="board model file")
    _add_sampling(p)
    p.add_argument("prompt", help="text to start from")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="fidelity report: integer golden model vs float reference",
                       description="Compare the integer golden model of a board model file with the float "
                                   "reference of its checkpoint on held-out text: bits per byte of each, "
                                   "top-1 next-token agreement and logit error.")
    p.add_argument("--model", required=True, metavar="FILE", help="board model file")
    p.add_argument("--checkpoint", metavar="HF_DIR",
                   help="float checkpoint (default: the directory of FILE, else the one recorded in it)")
    p.add_argument("--text", metavar="FILE", help="held-out text (default: the corpus's validation split)")
    p.add_argument("--chunks", type=int, default=32, help="number of windows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per window (default 256)")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when a target is missed")
    p.set_defaults(func=cmd_eval)

    from mmfree.host.link import DEFAULT_TIMEOUT
    from mmfree.protocol import DEFAULT_BAUD
    p = sub.add_parser("run", help="generate text on a board over its serial link",
                       description="Load a board model file into an mmfree accelerator (a board, the "
                                   "simulated board or the reference model) over its serial link, "
                                   "generate text from a prompt on it as it streams, then print one "
                                   "line on stderr: tokens/s over the link and the device's cycles "
                                   "per token.")
    p.add_argument("--port", required=True, metavar="URL",
                   help="serial port or pyserial URL: /dev/ttyUSB1, socket://127.0.0.1:5555, ...")
    p.add_argument("--model", required=True, metavar="FILE", help="board model file")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD, metavar="B",
                   help=f"the baud rate the bitstream was built for (default {DEFAULT_BAUD})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for each reply of the board (default {DEFAULT_TIMEOUT:g})")
    _add_sampling(p)
    p.add_argument("prompt", help="text to start from")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="generate text on the simulated board (the README's main command)",
                       description="Build the simulated board (the accelerator's gateware compiled with "
                                   "Verilator; cached after the first time), start it, load the model "
                                   "into it over its serial link and generate text, then print the "
                                   "device's cycles per token and the projected tokens/s.")
    p.add_argument("--model", default=str(SHIPPED_MODEL), metavar="FILE",
                   help="board model file (default: the shipped tiny-fortunes)")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for each reply of the simulated board (default 30)")
    _add_sampling(p)
    p.add_argument("prompt", nargs="?", default="Love is", help="text to start from (default 'Love is')")
    p.set_defaults(func=cmd_demo)

    from mmfree.hdl.boards import BOARDS
    p = sub.add_parser("build", help="build (and program) the accelerator's bitstream for a board",
                       description="Synthesize, place and route the accelerator for a board with the "
                                   "PyPI toolchain (yowasp yosys, nextpnr, icepack; minutes), check "
                                   "that it fits and meets its clock, and write the .bin and a "
                                   "report into --out.")
    p.add_argument("--board", required=True, choices=sorted(BOARDS), help="the board")
    p.add_argument("--lanes", type=int, choices=(8, 16, 32), help="ternary core lanes (default: the board's)")
    p.add_argument("--clock-mhz", type=float, metavar="F",
                   help="clock in MHz (default: the board's); the PLL must make it within 0.5%%")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default build/BOARD)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="nextpnr placer seed (default 1)")
    p.add_argument("--program", action="store_true",
                   help="write the bitstream to the board with iceprog afterwards")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("sim-board", help="serve the simulated board (the gateware, Verilator) on a TCP port",
                       description="Compile the accelerator's gateware with Verilator (cached; under a "
                                   "minute the first time), run it with its UART pins bridged bit by bit "
                                   "to a TCP port on 127.0.0.1, print the URL to give `mmfree run --port` "
                                   "as the first line on stdout, and serve until Ctrl-C.")
    p.add_argument("--port", type=int, default=5555, metavar="N", help="TCP port (default 5555; 0: any free port)")
    p.add_argument("--lanes", type=int, default=ICEBREAKER.lanes, choices=(8, 16, 32),
                   help=f"ternary core lanes (default {ICEBREAKER.lanes})")
    p.add_argument("--core", choices=("accelerator", "stub"), default="accelerator",
                   help="the accelerator core (default) or the link layer's test double (StubCore)")
    p.set_defaults(func=cmd_sim_board)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_tokens", 0) < 0:
        parser.error("--max-tokens must not be negative")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nmmfree: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError) as exc:      # our file/format errors are ValueErrors
        if os.environ.get("MMFREE_DEBUG"):
            raise
        print(f"mmfree: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
