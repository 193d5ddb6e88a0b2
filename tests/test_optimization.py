"""What every recipe shares to optimise: the optimizers and their weight decay, the learning-rate schedules and
warm-up step by step, and the training step's state across a resume."""
import pytest
import torch

import optimization
import parser as vg_parser


def _args(*flags):
    return vg_parser.parse_arguments(["--device", "cpu", *flags], require_dataset=False)


def _tiny_optimizer(args):
    model = torch.nn.Linear(3, 2)
    return model, optimization.make_optimizer(args, torch.nn.Sequential(model))


@pytest.mark.parametrize("optim,flags,weight_decay", [("adam", [], 0.0), ("sgd", [], 0.001), ("adamw", [], 0.01),
                                                      ("adamw", ["--weight_decay", "9.5e-9"], 9.5e-9)])
def test_optimizers_and_their_weight_decay(optim, flags, weight_decay):
    args = _args("--optim", optim, "--lr", "0.01", *flags)
    _, optimizer = _tiny_optimizer(args)
    expected_type = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim]
    assert type(optimizer) is expected_type
    assert optimizer.param_groups[0]["weight_decay"] == weight_decay and optimizer.param_groups[0]["lr"] == 0.01


def test_recipe_modules_get_their_own_learning_rate():
    args = _args("--lr", "0.001")
    classifier = torch.nn.Linear(4, 7)
    optimizer = optimization.make_optimizer(args, torch.nn.Linear(3, 2), [(classifier, 0.01)])
    assert [group["lr"] for group in optimizer.param_groups] == [0.001, 0.01]
    assert optimizer.param_groups[1]["params"] == list(classifier.parameters())


def test_multistep_with_warm_up_step_by_step():
    """MixVPR's: warm-up over 650 steps ((s + 1) / 650), then x0.3 at epochs 5, 10, 15, 25, 45."""
    args = _args("--scheduler", "multistep", "--warmup_steps", "650", "--lr", "0.05")
    _, optimizer = _tiny_optimizer(args)
    step = optimization.TrainingStep(args, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    expected = {(0, 0): 1 / 650, (1, 0): 2 / 650, (649, 0): 1.0, (700, 0): 1.0, (700, 4): 1.0, (700, 5): 0.3,
                (900, 10): 0.3 ** 2, (5000, 30): 0.3 ** 4, (9000, 79): 0.3 ** 5, (10, 5): 11 / 650 * 0.3}
    for (steps_done, epoch), factor in expected.items():
        step.steps_done, step.epoch = steps_done, epoch
        assert step.lr_factor == pytest.approx(factor)


def test_linear_decay_and_no_schedule():
    """SALAD's LinearLR: lr(k) = lr0 (1 - 0.8 min(k, 4000) / 4000); none keeps --lr."""
    for steps_done, factor in ((0, 1.0), (1, 1 - 0.8 / 4000), (2000, 0.6), (4000, 0.2), (9999, 0.2)):
        assert optimization.schedule_factor("linear", steps_done, 0, end_factor=0.2, decay_steps=4000) == \
            pytest.approx(factor)
    assert optimization.schedule_factor("none", 12345, 60) == 1.0
    assert optimization.schedule_factor("none", 4, 0, warmup_steps=10) == pytest.approx(0.5)


def test_steps_apply_the_schedule_to_every_group_and_the_state_resumes():
    args = _args("--scheduler", "linear", "--lr_decay_steps", "4", "--lr_end_factor", "0.2", "--lr", "0.1")
    model, optimizer = _tiny_optimizer(args)
    step = optimization.TrainingStep(args, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    seen = []
    for _ in range(6):
        step(model(torch.ones(1, 3)).sum())
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02, 0.02])
    resumed = optimization.TrainingStep(args, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    resumed.load_state_dict(step.state_dict())
    assert resumed.steps_done == 6 and resumed.lr_factor == pytest.approx(0.2)


def test_flags_are_checked():
    with pytest.raises(SystemExit):
        _args("--rand_augment", "0", "9")
    with pytest.raises(SystemExit):
        _args("--weight_decay", "-1")
    assert _args("--resize", "320", "320").train_resize == [320, 320]
    assert _args("--train_resize", "224", "224").train_resize == [224, 224]
