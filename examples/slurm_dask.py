"""Segment many slides on a Slurm cluster: Dask workers as Slurm jobs (one GPU each), the work sent by `predict`.

Run it from the project folder on a login node, or better inside a small long-running Slurm job (the Dask
scheduler lives in this process for the whole run):

    pip install dask-jobqueue          # optional dependency, only for this script
    python examples/slurm_dask.py --partition gpu --jobs 8 --cpus_per_job 8 --memory 64GB \\
        --walltime 04:00:00 --account mylab -- \\
        --model_path output_lora/best_model.pth --input "/shared/study/*.svs" --output_dir /shared/study_nuclei

Everything after `--` goes to `python main.py predict` unchanged. Each worker job asks Slurm for one GPU
(`--gres gpu:1`; `--cpu` for CPU-only jobs) and runs one Dask worker process with one task thread (one
slide at a time). Slurm sets CUDA_VISIBLE_DEVICES for the job, so each worker is pinned to its own GPU; a node
with 8 GPUs simply runs 8 such jobs. `--cpus_per_job` CPUs are booked per job and become the worker's torch
threads. The input slides, this project and the output folder must be on a file system shared by all nodes.

If a node dies, the scheduler gives its slides to the other workers (and Slurm's job is not replaced unless
you use --adapt). If this script itself dies, nothing finished is lost: rerun the same command and the slides
already done are skipped (resume), the others are redone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partition", default=None, help="Slurm partition (queue) of the worker jobs")
    parser.add_argument("--account", default=None, help="Slurm account charged for the worker jobs")
    parser.add_argument("--jobs", type=int, default=4, help="worker jobs to start")
    parser.add_argument("--adapt", action="store_true",
                        help="let Dask start up to --jobs jobs as needed (and replace jobs that ended) instead of "
                             "exactly --jobs")
    parser.add_argument("--cpu", action="store_true", help="CPU-only worker jobs (default: one GPU per job)")
    parser.add_argument("--gres", default="gpu:1",
                        help="the GPU request of each job (#SBATCH --gres=...); empty with --extra=--gpus=1 on "
                             "sites that want --gpus")
    parser.add_argument("--cpus_per_job", type=int, default=8, help="CPU cores booked per job")
    parser.add_argument("--memory", default="64GB", help="memory per job")
    parser.add_argument("--walltime", default="04:00:00", help="time limit of each worker job")
    parser.add_argument("--extra", action="append", default=[], help="more #SBATCH lines, e.g. '--constraint=a100'")
    parser.add_argument("--interface", default=None,
                        help="network interface the scheduler and workers talk over, e.g. ib0 (default: Dask's choice)")
    parser.add_argument("--log_dir", default="dask-logs", help="folder for the worker jobs' logs")
    return parser


def build_cluster(args: argparse.Namespace):
    """The SLURMCluster of `args` (nothing is submitted until it is scaled)."""
    from dask_jobqueue import SLURMCluster

    directives = [f"--gres={args.gres}"] if args.gres and not args.cpu else []
    return SLURMCluster(
        queue=args.partition, account=args.account, walltime=args.walltime, memory=args.memory,
        cores=1,                         # Dask task threads per job: one slide at a time
        processes=1,                     # one worker process per job (per GPU)
        job_cpu=args.cpus_per_job,       # the CPUs Slurm books: the worker's torch threads
        job_extra_directives=directives + list(args.extra),
        job_script_prologue=[f"cd {PROJECT_DIR}", f"export PYTHONPATH={PROJECT_DIR}:$PYTHONPATH",
                             # workers may start their own post-processing processes
                             "export DASK_DISTRIBUTED__WORKER__DAEMON=False"],
        log_directory=args.log_dir,
        interface=args.interface,
    )

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    predict_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(own)
    if not predict_args:
        parser.error("give the predict options after '--' (at least --model_path, --input and --output_dir)")

    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        print("error: dask-jobqueue is not installed (pip install dask-jobqueue)", file=sys.stderr)
        return 2
    import main as cli

    cluster = build_cluster(args)
    try:
        if args.adapt:
            cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)
        else:
            cluster.scale(jobs=args.jobs)
        print(cluster.job_script())
        return cli.main(["predict", *predict_args, "--scheduler", cluster.scheduler_address])
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
