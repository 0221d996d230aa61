"""Resume and best-model checkpoints: atomic, weights_only, and a resumed run continues."""

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from monai_mrngan.engines.checkpoint import BestCheckpoint, ResumeCheckpoint, load_state


def _trainer(max_epochs, net, opt):
    data = [{"image": torch.randn(4, 3), "label": torch.randn(4, 1)} for _ in range(3)]
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=net,
        optimizer=opt, loss_function=torch.nn.MSELoss(), decollate=False,
    )


def test_resume_continues_from_last_epoch(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    tr = _trainer(2, net, opt)
    ResumeCheckpoint(tmp_path / "last.pt", {"net": net, "opt": opt, "trainer": tr}).attach(tr)
    tr.run()
    assert tr.state.epoch == 2 and (tmp_path / "last.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    net2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.Adam(net2.parameters(), 1e-2)
    tr2 = _trainer(4, net2, opt2)
    ResumeCheckpoint(tmp_path / "last.pt", {"net": net2, "opt": opt2, "trainer": tr2}).attach(tr2)
    epochs_run = []
    tr2.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_run.append(e.state.epoch))
    tr2.run()
    assert epochs_run == [3, 4]  # picked up after epoch 2, not from scratch
    assert load_state(tmp_path / "last.pt")["trainer"]["iteration"] == 12  # 4 epochs x 3 batches


def test_best_checkpoint_saves_only_improvements(tmp_path):
    net = torch.nn.Linear(2, 1)
    best = BestCheckpoint(tmp_path / "model.pt", net, metric_name="m", mode="min")

    class E:  # minimal engine stand-in: only state.metrics is read
        class state:
            metrics = {}

    for value, saved in [(0.5, True), (0.7, False), (0.2, True)]:
        E.state.metrics = {"m": value}
        with torch.no_grad():
            net.weight.fill_(value)
        best(E)
        stored = load_state(tmp_path / "model.pt")["weight"].flatten()[0].item()
        assert (abs(stored - value) < 1e-6) == saved
    assert best.state_dict() == {"best": 0.2}


def test_load_state_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for path, text in [(tmp_path / "missing.pt", "no checkpoint"), (bad, "unreadable checkpoint")]:
        try:
            load_state(path)
        except (FileNotFoundError, ValueError) as err:
            assert str(path) in str(err) and text in str(err)
        else:
            raise AssertionError("expected an error")


def test_epoch_time_budget_stops_before_an_epoch_that_cannot_finish():
    """Epochs of 3 s against a 10 s budget: 3 epochs run (9 s), a 4th would end past 10 s and is never started, and
    the validation attached before the budget still ran after the 3rd. Ignite's TimeLimit alone would cut the 4th."""
    import pytest
    from ignite.engine import Engine

    from monai_mrngan.engines.time_budget import EpochTimeBudget

    now = [0.0]
    engine = Engine(lambda e, batch: now.__setitem__(0, now[0] + 1.0))  # each iteration: 1 s
    validated = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validated.append(e.state.epoch))
    EpochTimeBudget(10.0, clock=lambda: now[0]).attach(engine)
    engine.run(range(3), max_epochs=20)
    assert engine.state.epoch == 3 and validated == [1, 2, 3] and now[0] == 9.0
    with pytest.raises(ValueError, match="time budget"):
        EpochTimeBudget(0)


def test_epoch_time_budget_ranks_agree(monkeypatch):
    """Under DDP the ranks stop after the same epoch: a rank whose own clock would go on stops when another rank's
    verdict (the all-reduce MAX) says stop, and goes on when every rank does."""
    import ignite.distributed as idist
    from ignite.engine import Engine

    from monai_mrngan.engines.time_budget import EpochTimeBudget

    for others_stop, epochs in ((1.0, 1), (0.0, 3)):
        verdicts = []
        monkeypatch.setattr(idist, "get_world_size", lambda: 2)
        monkeypatch.setattr(idist, "all_reduce", lambda x, op: verdicts.append((x, op)) or max(x, others_stop))
        now = [0.0]
        engine = Engine(lambda e, batch: now.__setitem__(0, now[0] + 1.0))
        EpochTimeBudget(10.0, clock=lambda: now[0]).attach(engine)
        engine.run(range(3), max_epochs=20)
        assert engine.state.epoch == epochs and verdicts[0] == (0.0, "MAX")  # this rank's own verdict: go on
