"""Which CPU channels-last convolutions crash torch's backward: each shape's forward + backward in a child process.

    python -m tools.conv_scan [--routed] [--threads 2] [--shapes FILE]   # one shape a line: see Shape

The kernel corrupts the heap, so no shape runs in this process: a child runs the shapes one after another, printing
each before and after; when it dies, the shape it was running is recorded as a crash with its exit signal, and a new
child goes on with the next shape. --routed builds each convolution as kd.cpu_conv routes it (SubsampledPointwise
Conv2d for strided 1x1 ones). Without --shapes, a default grid: 1x1 and 3x3, stride 1 and 2, 2 to 32 input
channels, 16 to 64 px, batch 8, float32.
"""
import argparse
import itertools
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

if __package__ in (None, ""):  # python tools/conv_scan.py: kd imports from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


class Shape(NamedTuple):
    """One convolution: channels in and out, kernel, stride, input height = width, groups, dtype, batch."""

    cin: int
    cout: int
    kernel: int
    stride: int
    size: int
    groups: int = 1
    dtype: str = "float32"
    batch: int = 8

    def line(self) -> str:
        return " ".join(map(str, self))

    @classmethod
    def parse(cls, line: str) -> "Shape":
        *numbers, dtype, batch = line.split()
        return cls(*map(int, numbers), dtype, int(batch))


def default_grid() -> list[Shape]:
    return [Shape(cin, cout, kernel, stride, size) for cin, cout, kernel, stride, size in itertools.product(
        (2, 4, 8, 16, 32), (8, 16, 32), (1, 3), (1, 2), (16, 32, 64))]


def scan(shapes: list[Shape], routed: bool = False, threads: int = 2) -> dict[Shape, str]:
    """{shape: how its child died} for the shapes that crashed; the others ran clean."""
    crashed: dict[Shape, str] = {}
    position = 0
    while position < len(shapes):
        child = subprocess.run([sys.executable, "-m", "tools.conv_scan", "--child", str(threads)]
                               + (["--routed"] if routed else []), cwd=REPO, capture_output=True, text=True,
                               input="".join(shape.line() + "\n" for shape in shapes[position:]))
        position += child.stdout.splitlines().count("ok")
        if child.returncode == 0:
            break
        last_error = (child.stderr.strip().splitlines() or [""])[-1]
        crashed[shapes[position]] = f"exit code {child.returncode}" + (f": {last_error}" if last_error else "")
        position += 1
    return crashed


def run_child(routed: bool, threads: int) -> None:
    """Each stdin line's convolution, channels-last, forward + backward three times; 'ok' after each shape."""
    import torch
    from torch import nn

    from kd import cpu_conv

    torch.set_num_threads(threads)
    for line in sys.stdin:
        shape = Shape.parse(line)
        dtype = getattr(torch, shape.dtype)
        conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, shape.stride, shape.kernel // 2, groups=shape.groups)
        conv = conv.to(dtype=dtype, memory_format=torch.channels_last)
        if routed:
            cpu_conv.route_strided_pointwise(conv)
        print("start", shape.line(), flush=True)
        for _ in range(3):
            x = torch.randn(shape.batch, shape.cin, shape.size, shape.size, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            conv(x).sum().backward()
        print("ok", flush=True)


def main(argv: Optional[list[str]] = None) -> dict[Shape, str]:
    parser = argparse.ArgumentParser(prog="python -m tools.conv_scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--routed", action="store_true", help="convolutions as kd.cpu_conv routes them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", type=Path, help="one shape a line: cin cout kernel stride size groups dtype batch")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # the child process: its thread count
    args = parser.parse_args(argv)
    if args.child is not None:
        run_child(args.routed, args.child)
        return {}
    shapes = [Shape.parse(line) for line in args.shapes.read_text().splitlines() if line.strip()] \
        if args.shapes else default_grid()
    crashed = scan(shapes, args.routed, args.threads)
    for shape, death in crashed.items():
        print(f"crash: {shape.line()}  ({death})")
    print(f"{len(crashed)} of {len(shapes)} shapes crashed{' (routed)' if args.routed else ''}")
    return crashed


if __name__ == "__main__":
    main()
