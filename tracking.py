"""Weights & Biases for --track, an optional part beside common.py: the W&B run a --track run logs to (its args,
its code, TensorBoard's scalars through sync_tensorboard) and its tables of sample responses.

common.py imports this file only for a run with --track (common.start_run, make_logger, Logger.show_samples); a run
without --track never reads it, and without this file beside common.py --track stops with one line that names it.
common.finish_tracking ends the W&B run."""

from common import fail


def import_wandb():
    """Weights & Biases for --track, or a one-line error that names the install (the scripts run without it)."""
    try:
        import wandb
    except ImportError:
        fail("--track logs to Weights & Biases, which is not installed; pip install wandb, or run without --track")
    return wandb


def start_wandb(args, run_name: str):
    """The W&B run of --track (cleanRL's wandb.init): made before TensorBoard's SummaryWriter, which sync_tensorboard
    patches so that every scalar written to TensorBoard goes to W&B too; the config is the run's args."""
    return import_wandb().init(
        project=args.wandb_project_name,
        entity=args.wandb_entity,
        sync_tensorboard=True,
        config=vars(args),
        name=run_name,
        save_code=True,
    )


def log_samples_table(wandb_run, step: int, rows: list):
    """Sample rows (dicts of one set of columns) as a wandb.Table under `samples`, with a `step` column, logged at
    the TensorBoard step."""
    import wandb

    columns = list(rows[0])
    table = wandb.Table(columns=["step", *columns], data=[[step, *row.values()] for row in rows])
    wandb_run.log({"samples": table, "global_step": step})
