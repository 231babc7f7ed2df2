#!/usr/bin/env python3
"""02_gpt_bert_t5_comparison: placeholder until its lesson issue lands; prints the environment and exits."""
from __future__ import annotations

from common import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.base_parser(__doc__).parse_args(argv)
    ctx = cli.start(__file__, args)
    return ctx.report.finish()


if __name__ == "__main__":
    cli.run(main)
