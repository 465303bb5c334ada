"""The ``ddfm-fast`` command line (click).

This file lives at the repository root and is installed as ``ddfm_fast.cli`` through the symlink
``ddfm_fast/cli.py``; ``python -m ddfm_fast`` runs it too. Commands are thin: they map flags onto the
package's API and leave the work to it.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddfm-fast")
def main() -> None:
    """ddfm-fast: DDFM image fusion (Zhao et al., ICCV 2023), faithful and fast."""
    from ddfm_fast._alloc import keep_freed_memory; keep_freed_memory(announce=True)  # noqa: E702 (glibc malloc)


from ddfm_fast.cli_eval import eval_command, compare_command  # noqa: E402

main.add_command(eval_command)
main.add_command(compare_command)

from ddfm_fast.cli_fuse import fuse_command, info_command  # noqa: E402

main.add_command(fuse_command)
main.add_command(info_command)

from ddfm_fast.cli_bench import bench_command  # noqa: E402
from ddfm_fast.cli_download import download_command  # noqa: E402
from ddfm_fast.cli_score import score_command  # noqa: E402
from ddfm_fast.cli_train import train_prior_command  # noqa: E402

main.add_command(train_prior_command)
main.add_command(download_command)
main.add_command(score_command)
main.add_command(bench_command)

from ddfm_fast.cli_serve import serve_command  # noqa: E402

main.add_command(serve_command)


if __name__ == "__main__":  # pragma: no cover
    main()
