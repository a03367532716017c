"""scripts/run_ablations.py: one command per ablation table, and the same under faults and misuse: options the
rows would not honour refused before any row trains, Ctrl-C and SIGTERM kept to one line with nothing finished
lost, a damaged row record or a full disk survived, two runs of one table refused."""
import errno
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from ahiq.files import take_lock
from conftest import ROOT, TINY, wait_for_line

sys.path.insert(0, str(ROOT / "scripts"))
import run_ablations  # noqa: E402

SIZE = [f"model.{k}={v}" for k, v in TINY.items()]


def table_args(tmp_path, table="8", *extra, jobs=1):
    return ["--table", table, "--jobs", str(jobs), "--opt", str(ROOT / "options" / "demo.yaml"),
            f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=1",
            "train.batch_size=8", *SIZE, *extra]


@pytest.mark.parametrize("extra, said", [
    (["model.fusion=concat"], "the override 'model.fusion=concat': every row of Table 8 sets model.fusion itself"),
    (["model.patch_size=8"], "the override 'model.patch_size=8': every row of Table 8 sets model.patch_size itself"),
    (["test.output=results"], "test.output 'results' (from"),  # two rows would write one metrics.json
    (["test.checkpoint=pipal"], "test.checkpoint 'pipal' (from"),  # every row would test the same model
    (["train.resume=checkpoints/x.pth"], "train.resume 'checkpoints/x.pth' (from"),
])
def test_options_the_rows_would_not_honour_are_refused_before_any_row(tmp_path, monkeypatch, capsys, extra, said):
    monkeypatch.chdir(tmp_path)
    assert run_ablations.main(table_args(tmp_path, "8", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and said in err, err
    assert not (tmp_path / "checkpoints").exists()


def test_a_row_that_cannot_run_and_a_table_folder_in_the_way_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Table 7's InceptionResNetV2 row: 16-pixel crops are too small for its unpadded stem
    assert run_ablations.main(table_args(tmp_path, "7", "model.img_size=16")) == 2
    assert "model.img_size 16 is too small for model.cnn inception_resnet_v2" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "demo_table8").write_text("")
    assert run_ablations.main(table_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: checkpoints/demo_table8 is a file where the table's folder checkpoints/demo_table8 goes: "
                   "move it away, then run again")
    (tmp_path / "checkpoints" / "demo_table8").unlink()
    (tmp_path / "checkpoints" / "demo_table8").mkdir()
    held = take_lock(tmp_path / "checkpoints" / "demo_table8" / ".lock", "a test", "")  # another run of this table
    try:
        assert run_ablations.main(table_args(tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Table 8's folder checkpoints/demo_table8 is in use by process" in err
    finally:
        held.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["demo_table8"]  # no row started


@pytest.mark.slow
def test_a_table_stopped_by_ctrl_c_continues_then_skips_what_is_done(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the first row trains: one line, exit 130, the row's latest.pth; the same command completes
    the table (the row resumed), a rerun trains nothing, a damaged row record runs its row again, a full disk
    when the table is written loses no row, and more epochs resume every row."""
    args = table_args(tmp_path, "8", "train.epochs=2", jobs=2)
    runner = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run_ablations.py"), *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "checkpoints" / "demo_ahiq" / "train.log"
    wait_for_line(runner, log, "epoch 1 loss")
    runner.send_signal(signal.SIGINT)
    out, err = runner.communicate(timeout=300)
    assert runner.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["stopped by SIGINT: every finished row is kept (its ablation.json), an "
                                        "interrupted one continues; run the same command again to complete the table"]
    assert (tmp_path / "checkpoints" / "demo_ahiq" / "latest.pth").is_file()
    assert not (tmp_path / "checkpoints" / "demo_table8" / "table.md").exists()

    monkeypatch.chdir(tmp_path)
    assert run_ablations.main(args) == 0
    out = capsys.readouterr().out
    assert log.read_text().count("resumed from") == 1  # the interrupted row continued where it stopped
    table = (tmp_path / "checkpoints" / "demo_table8" / "table.md").read_text()
    assert table in out
    rows = [line for line in table.splitlines() if line.startswith("| patch") or line.startswith("| spatial")]
    assert len(rows) == 3
    for row, experiment in zip(rows, ("demo_ahiq", "demo_spatial", "demo_patch+spatial")):
        metrics = json.loads((tmp_path / "checkpoints" / experiment / "test" / "metrics.json").read_text())
        assert f"| {metrics['plcc']:.4f} | {metrics['srocc']:.4f} | {metrics['main']:.4f} | {experiment} |" in row
        saved = torch.load(tmp_path / "checkpoints" / experiment / "best.pth", weights_only=True)
        assert saved["config"]["pooling"] == {"demo_ahiq": "patch", "demo_spatial": "spatial"}.get(experiment,
                                                                                                    "patch+spatial")
    assert len({row.split("|")[5] for row in rows}) == 3  # each row its own model's result
    assert "| patch | 0.823 | 0.813 | 1.636 |" in table and "| patch + spatial | 0.801 | 0.791 | 1.593 |" in table
    csv_rows = (tmp_path / "checkpoints" / "demo_table8" / "table.csv").read_text().splitlines()
    assert csv_rows[0] == "pooling,paper PLCC,paper SROCC,paper main,ours PLCC,ours SROCC,ours main,experiment"

    # a rerun trains and tests nothing; a damaged record runs its row again (train.py has nothing left to do)
    (tmp_path / "checkpoints" / "demo_spatial" / "ablation.json").write_text('{"options": ')
    assert run_ablations.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("not run again") == 2 and "demo_spatial/ablation.json cannot be read" in out
    assert (tmp_path / "checkpoints" / "demo_table8" / "table.md").read_text() == table

    # a full disk as the table is written: one line, every row kept; the next run writes the table
    real = run_ablations.write_atomically

    def full(path, data):
        if path.name == "table.md":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(run_ablations, "write_atomically", full)
    (tmp_path / "checkpoints" / "demo_table8" / "table.md").unlink()
    assert run_ablations.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "run the same command again" in err
    monkeypatch.setattr(run_ablations, "write_atomically", real)
    assert run_ablations.main(args) == 0 and capsys.readouterr().out.count("not run again") == 3
    assert (tmp_path / "checkpoints" / "demo_table8" / "table.md").read_text() == table

    spatial = tmp_path / "checkpoints" / "demo_spatial" / "train.log"
    resumed = spatial.read_text().count("resumed from")
    assert run_ablations.main([a.replace("train.epochs=2", "train.epochs=3") for a in args]) == 0
    log = spatial.read_text()
    assert log.count("resumed from") == resumed + 1 and log.count("epoch 3 loss") == 1


def test_a_row_another_run_is_training_is_waited_for_then_taken_not_trained_again(tmp_path, monkeypatch, capsys):
    """AHIQ's row is every table's: a second table's run waits for the first's (the row's lock), then finds the
    row's record and trains nothing."""
    import threading

    from ahiq.files import release_and_remove

    monkeypatch.chdir(tmp_path)
    args = run_ablations.arguments().parse_args(table_args(tmp_path, "6"))
    args.base = "demo"
    row = run_ablations.TABLES[6].rows()[0]
    assert (run_ablations.experiment_name(row, args.base) == "demo_ahiq"
            == run_ablations.experiment_name(run_ablations.TABLES[8].rows()[0], args.base))
    options = run_ablations.load_options(args.opt, run_ablations.row_options(args, row, None)[2:])
    result = {"plcc": 0.5, "srocc": 0.4, "krocc": 0.3, "rmse": 0.2, "main": 0.9, "n": 25}
    lock = tmp_path / "checkpoints" / ".demo_ahiq.ablation.lock"
    lock.parent.mkdir()
    held = take_lock(lock, "the other table's run", "")

    def the_other_run_finishes_the_row():
        time.sleep(1.0)
        (tmp_path / "checkpoints" / "demo_ahiq").mkdir()
        (tmp_path / "checkpoints" / "demo_ahiq" / "ablation.json").write_text(
            json.dumps({"options": run_ablations._comparable(options), "result": result}))
        release_and_remove(held, lock)

    class NoTraining(run_ablations.Children):
        def run(self, command, out):
            raise AssertionError(f"the row was run again: {command}")

    other = threading.Thread(target=the_other_run_finishes_the_row)
    other.start()
    assert run_ablations.run_row(args, row, None, tmp_path, NoTraining()) == result
    other.join()
    captured = capsys.readouterr()
    assert "demo_ahiq: waiting for another run_ablations.py training this row" in captured.err
    assert "demo_ahiq: trained and tested before with these options, not run again" in captured.out
    assert not lock.exists()
