"""The command line: the original's flags and defaults, aliases, and every cross-flag check as a clean error."""
import os
import re
import subprocess
import sys

import pytest

import parser as vg_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The original benchmark's flags: name -> (default, choices or None). --device and --num_workers differ on purpose.
ORIGINAL_FLAGS = {
    "train_batch_size": (4, None), "infer_batch_size": (16, None),
    "criterion": ("triplet", ["triplet", "sare_ind", "sare_joint"]), "margin": (0.1, None),
    "epochs_num": (1000, None), "patience": (3, None), "lr": (1e-05, None), "lr_crn_layer": (0.005, None),
    "lr_crn_net": (0.0005, None), "optim": ("adam", ["adam", "sgd"]), "cache_refresh_rate": (1000, None),
    "queries_per_epoch": (5000, None), "negs_num_per_query": (10, None), "neg_samples_num": (1000, None),
    "mining": ("partial", ["partial", "full", "random", "msls_weighted"]),
    "backbone": ("resnet18conv4", ["alexnet", "vgg16", "resnet18conv4", "resnet18conv5", "resnet50conv4",
                                   "resnet50conv5", "resnet101conv4", "resnet101conv5", "cct384", "vit"]),
    "l2": ("before_pool", ["before_pool", "after_pool", "none"]),
    "aggregation": ("netvlad", ["netvlad", "gem", "spoc", "mac", "rmac", "crn", "rrm", "cls", "seqpool"]),
    "netvlad_clusters": (64, None), "pca_dim": (None, None), "fc_output_dim": (None, None),
    "pretrain": ("imagenet", ["imagenet", "gldv2", "places", "none"]),
    "off_the_shelf": ("imagenet", ["imagenet", "radenovic_sfm", "radenovic_gldv1", "naver"]),
    "trunc_te": (None, None), "freeze_te": (None, None),  # checked against the chosen backbone's depth
    "seed": (0, None), "resume": (None, None), "resize": ([480, 640], None),
    "test_method": ("hard_resize", ["hard_resize", "single_query", "central_crop", "five_crops", "nearest_crop",
                                    "maj_voting"]),
    "majority_weight": (0.01, None), "efficient_ram_testing": (False, None),
    "val_positive_dist_threshold": (25, None), "train_positives_dist_threshold": (10, None),
    "recall_values": ([1, 5, 10, 20], None), "brightness": (0, None), "contrast": (0, None),
    "saturation": (0, None), "hue": (0, None), "rand_perspective": (0, None), "horizontal_flip": (False, None),
    "random_resized_crop": (0, None), "random_rotation": (0, None), "datasets_folder": (None, None),
    "dataset_name": ("pitts30k", None), "pca_dataset_folder": (None, None), "save_dir": ("default", None),
}


@pytest.fixture
def datasets_folder(tmp_path):
    for name in ("pitts30k", "msls", "st_lucia"):
        (tmp_path / name / "images").mkdir(parents=True)
    return str(tmp_path)


def parse(datasets_folder, *flags):
    return vg_parser.parse_arguments([f"--datasets_folder={datasets_folder}", *flags])


def test_every_original_flag_has_its_default_and_choices():
    actions = {action.dest: action for action in vg_parser.build_parser()._actions}
    for name, (default, choices) in ORIGINAL_FLAGS.items():
        assert name in actions, name
        assert actions[name].default == default, name
        if choices is not None:  # at least the original's (registries grow)
            assert set(map(str, actions[name].choices)) >= set(map(str, choices)), name


def test_encoder_flags_take_the_original_values_and_stop_at_the_backbone_depth(datasets_folder):
    for value in range(0, 14):
        args = parse(datasets_folder, "--backbone=cct384", "--resize=384", "384", f"--trunc_te={value}")
        assert args.trunc_te == value
    for value in range(-1, 14):
        assert parse(datasets_folder, "--backbone=cct384", "--resize=384", "384",
                     f"--freeze_te={value}").freeze_te == value
    completed = subprocess.run([sys.executable, "train.py", f"--datasets_folder={datasets_folder}", "--backbone=vit",
                                "--resize=224", "224", "--aggregation=cls", "--trunc_te=13"],
                               cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "--trunc_te must be in 0..12 for this backbone (12 encoder layers), got 13" in completed.stderr


def test_device_and_workers_defaults_fit_the_machine():
    args = vg_parser.build_parser().parse_args([])
    assert args.device in ("cuda", "cpu")
    assert 0 <= args.num_workers <= (os.cpu_count() or 1)


def test_original_readme_spellings_are_aliases(datasets_folder):
    args = parse(datasets_folder, "--off_the_shelf=radenovic_gldv1", "--l2=after_pool", "--backbone=r101l4",
                 "--aggregation=gem", "--fc_output_dim=2048")
    assert args.backbone == "resnet101conv5"
    args = parse(datasets_folder, "--pretrained=places", "--horizontal_flipping", "--test_method=five_crops_mean")
    assert args.pretrain == "places" and args.horizontal_flip and args.test_method == "five_crops"
    assert parse(datasets_folder, "--test_method", "majority_voting").test_method == "maj_voting"
    assert parse(datasets_folder, "--resize=384", "512").resize == [384, 512]


def test_recall_values_are_sorted_and_unique(datasets_folder):
    assert parse(datasets_folder, "--recall_values", "10", "1", "5", "5").recall_values == [1, 5, 10]


def test_datasets_folder_falls_back_to_the_environment(datasets_folder, monkeypatch):
    monkeypatch.setenv("DATASETS_FOLDER", datasets_folder)
    assert vg_parser.parse_arguments(["--dataset_name=msls"]).datasets_folder == datasets_folder
    monkeypatch.delenv("DATASETS_FOLDER")
    args = vg_parser.parse_arguments(["--dataset_name=anything"], require_dataset=False)
    assert args.datasets_folder == vg_parser.DEFAULT_DATASETS_FOLDER


BAD_FLAGS = [
    (["--aggregation=crn"], "CRN must start from a trained NetVLAD: pass --resume"),
    (["--queries_per_epoch=5000", "--cache_refresh_rate=3000"], "must be a multiple of --cache_refresh_rate"),
    (["--mining=msls_weighted"], "--mining msls_weighted needs the msls dataset"),
    (["--off_the_shelf=naver", "--backbone=resnet50conv4", "--aggregation=gem", "--fc_output_dim=2048"],
     "--off_the_shelf naver models are ResNet conv5 \\+ GeM \\+ FC 2048"),
    (["--off_the_shelf=radenovic_sfm", "--backbone=resnet50conv5", "--aggregation=gem"], "--fc_output_dim 2048"),
    (["--pca_dim=256"], "--pca_dim needs --pca_dataset_folder"),
    (["--backbone=vit", "--aggregation=cls"], "--backbone vit needs --resize 224 224 or --resize 384 384"),
    (["--backbone=cct384", "--aggregation=seqpool", "--resize", "224", "224"],
     "--backbone cct384 needs --resize 384 384"),
    (["--backbone=resnet18conv4", "--aggregation=cls"], "cls"),
    (["--backbone=resnet50conv5", "--aggregation=seqpool"], "seqpool"),
    (["--backbone=cct384", "--aggregation=rmac", "--resize", "384", "384"], "rmac"),
    (["--backbone=vit", "--aggregation=spoc", "--resize", "224", "224"], "spoc"),
    (["--backbone=resnet19conv4"], "invalid choice: 'resnet19conv4'"),
    (["--aggregation=vlad"], "invalid choice: 'vlad'"),
    (["--test_method=ten_crops"], "invalid choice: 'ten_crops'"),
    (["--train_batch_size=0"], "--train_batch_size must be a positive integer"),
    (["--recall_values", "0", "5"], "--recall_values must be positive integers"),
    (["--resize", "0", "640"], "--resize needs two positive integers"),
    (["--hue=0.7"], "--hue must be in \\[0, 0.5\\]"),
    (["--lr=0"], "--lr must be positive"),
    (["--random_resized_crop=1"], "--random_resized_crop must be in \\[0, 1\\)"),
    (["--dataset_name=tokyo247"], "dataset 'tokyo247' not found in .* Pass --datasets_folder"),
    (["--resize", "480"], "expected 2 arguments"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flags_exit_2_with_one_clear_line(datasets_folder, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(datasets_folder, *flags)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert re.search(message, error_lines[0]), error_lines[0]


def test_cuda_on_a_machine_without_gpu_is_an_error(datasets_folder, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        parse(datasets_folder, "--device=cuda")
    assert "no CUDA GPU is available: use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_lists_every_flag_with_its_text(script):
    if not os.path.exists(os.path.join(REPO, script)):
        pytest.fail(f"{script} is missing")
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ORIGINAL_FLAGS:
        assert f"--{name}" in result.stdout, name
    for action in vg_parser.build_parser()._actions:
        assert action.help, f"{action.dest} has no help text"


def test_parsing_flags_loads_neither_faiss_nor_the_search_and_test_code():
    """The choices and option groups come from the registries; the heavy modules stay for the runs that use them."""
    heavy = ("faiss", "search", "test", "extraction", "pytorch_metric_learning", "sklearn")
    code = ("import sys, parser; parser.parse_arguments(['--device', 'cpu'], require_dataset=False); "
            f"print(sorted(name for name in {heavy!r} if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
