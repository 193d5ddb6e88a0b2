"""README.md: every command in it runs, in its smoke form, or says why it cannot run here.

Commands are the lines of the ```bash blocks (and inline `$ ...` spans). A command that needs what a test cannot
have (a real dataset, the network, minutes) ends with a `# needs <what>` comment; its flags must still parse, and a
model zoo name must exist. Every other command runs here in its smoke form:
- train.py / eval.py (also under torchrun, with 2 processes): on a tiny synthetic dataset, unless the command names a
  dataset that an earlier README command built; tiny images, one short epoch, random initial weights; the
  placeholder `logs/default/YYYY-MM-DD_HH-mm-ss/<file>.pth` becomes that file of a tiny training of the command's
  architecture; example folders (--queries_folder, --database_folder, --descriptors_folder) become test folders;
- tools/build_dataset.py reads the Lund photos of tests/data (their EXIF GPS); make_synthetic_dataset.py gets tiny
  sizes; the other tools run as written;
- scripts/*.sh --smoke: run by tests/test_sweep_scripts.py.
The commands run in README order within a block; two blocks run at a time.
"""
import concurrent.futures
import glob
import os
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import pytest

import make_synthetic_dataset
import parser as vg_parser
import results
from model import zoo
from test_sweep_scripts import SWEEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
LUND_PHOTOS = os.path.join(REPO, "tests", "data", "realdata", "opensfm_lund", "images")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
MARKER = re.compile(r"\s#\s*needs\b\s*(.*)$")
RUN_FOLDER_PLACEHOLDER = "logs/default/YYYY-MM-DD_HH-mm-ss/"

SMOKE_DATASET = "readme_smoke"
SMOKE_DATASET_SIZES = dict(train_database_num=40, train_queries_num=16, val_database_num=20, val_queries_num=8,
                           test_database_num=20, test_queries_num=8, image_size=(48, 64))
# Flags the command's own flags replace, and flags that replace the command's (sizes of the smoke form)
SMOKE_DEFAULTS = ["--pretrain", "none"]
SMOKE_FORCED = ["--device", "cpu", "--num_workers", "0", "--resize", "32", "48", "--epochs_num", "1",
                "--queries_per_epoch", "8", "--cache_refresh_rate", "8", "--neg_samples_num", "20",
                "--negs_num_per_query", "2", "--train_batch_size", "4", "--infer_batch_size", "8",
                "--netvlad_clusters", "8"]
SMOKE_PCA_DIM = "8"
SYNTHETIC_SMOKE_SIZES = ["--train_database_num", "20", "--train_queries_num", "8", "--val_database_num", "10",
                         "--val_queries_num", "4", "--test_database_num", "10", "--test_queries_num", "4",
                         "--image_size", "48", "64", "--processes", "1"]
TORCHRUN_PROCESSES = "2"


# ----------------------------------------------------------------------------------------------------------
# Commands of the README

@dataclass
class Command:
    text: str  # without the marker
    line: int
    block: int  # commands of one block run in order
    marker: Optional[str]  # what the command needs, when it cannot run here

    @property
    def id(self):
        return f"README.md:{self.line}"


def _command(text, line, block):
    match = MARKER.search(text)
    if match:
        return Command(text[:match.start()].strip(), line, block, match.group(1).strip())
    return Command(text.strip(), line, block, None)


def readme_commands(text):
    """The commands of the shell blocks (continuation lines joined, comment lines skipped) and of inline `$ ...`."""
    commands, block, fence, pending = [], 0, None, None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = re.match(r"^\s*```(\S*)\s*$", line)
        if opening:
            fence = None if fence is not None else opening.group(1)  # the language, while inside a block
            block += 1
            continue
        if fence in SHELL_LANGUAGES:
            stripped = line.strip()
            if pending is not None:
                pending = (pending[0] + " " + stripped.rstrip("\\").strip(), pending[1])
            elif stripped and not stripped.startswith("#"):
                pending = (stripped.rstrip("\\").strip(), number)
            if pending is not None and not stripped.endswith("\\"):
                commands.append(_command(pending[0], pending[1], block))
                pending = None
        elif fence is None:
            for span in re.findall(r"`\$ ([^`]+)`", line):
                block += 1
                commands.append(_command(span, number, block))
    return commands


with open(README) as _file:
    README_TEXT = _file.read()
COMMANDS = readme_commands(README_TEXT)


@dataclass
class Plan:
    kind: str  # "vg" (train.py / eval.py), "tool", "sweep" or "unknown"
    script: Optional[str] = None
    args: tuple = ()
    torchrun: bool = False


def plan(command):
    tokens = shlex.split(command.text)
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # environment assignments
        tokens = tokens[1:]
    if not tokens:
        return Plan("unknown")
    if tokens[0] == "torchrun":
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("--"):
            tokens = tokens[1 if "=" in tokens[0] else 2:]
        return Plan("vg", tokens[0], tuple(tokens[1:]), torchrun=True) if tokens else Plan("unknown")
    if tokens[0] in ("python", "python3") and len(tokens) > 1:
        script, args = tokens[1], tuple(tokens[2:])
        if script in ("train.py", "eval.py"):
            return Plan("vg", script, args)
        if script in ("tools/gather_results.py", "tools/build_dataset.py", "tools/check_dataset.py",
                      "make_synthetic_dataset.py"):
            return Plan("tool", script, args)
        return Plan("unknown", script, args)
    if re.match(r"^scripts/\w+\.sh$", tokens[0]):
        return Plan("sweep", tokens[0], tuple(tokens[1:]))
    return Plan("unknown", tokens[0], tuple(tokens[1:]))


def test_every_command_runs_here_or_says_what_it_needs():
    assert len(COMMANDS) > 30
    unknown = [f"{command.id}: {command.text}" for command in COMMANDS
               if command.marker is None and plan(command).kind == "unknown"]
    assert not unknown, ("README commands that the test cannot run in a smoke form: end them with "
                         "`# needs <what>` or teach tests/test_readme_commands.py to run them:\n" + "\n".join(unknown))
    empty = [command.id for command in COMMANDS if command.marker == ""]
    assert not empty, f"`# needs` without saying what: {empty}"
    sweeps = [command for command in COMMANDS if plan(command).kind == "sweep" and command.marker is None]
    for command in sweeps:
        assert plan(command).args == ("--smoke",), f"{command.id}: without --smoke a sweep needs a real dataset"
    assert sorted(os.path.basename(plan(c).script)[:-len(".sh")] for c in sweeps) == sorted(SWEEPS)


def test_the_extraction_sees_every_kind_of_command():
    text = "\n".join(["Prose `$ python3 eval.py --resume=x.pth` inline.", "```bash", "# a comment",
                      "python3 train.py --dataset_name=pitts30k \\", "    --mining=full   # needs pitts30k", "",
                      "./demo.sh", "```", "```txt", "python3 not_a_command.py", "```"])
    commands = readme_commands(text)
    assert [(c.text, c.line, c.marker) for c in commands] == [
        ("python3 eval.py --resume=x.pth", 1, None),
        ("python3 train.py --dataset_name=pitts30k --mining=full", 4, "pitts30k"),
        ("./demo.sh", 7, None)]
    assert [plan(c).kind for c in commands] == ["vg", "vg", "unknown"]
    assert plan(commands[1]).args == ("--dataset_name=pitts30k", "--mining=full")


# ----------------------------------------------------------------------------------------------------------
# Smoke forms

def _options(args):
    """[(flag, [values])] of an argument list; `--flag=value` is split as the parser splits it."""
    options = []
    for arg in args:
        if arg.startswith("--"):
            flag, equals, value = arg.partition("=")
            options.append((flag, [value] if equals else []))
        elif options:
            options[-1][1].append(arg)
        else:
            raise AssertionError(f"positional argument {arg!r} before any flag")
    return options


# Flags whose folder the parser checks: an existing folder stands in for the README's example folder
EXAMPLE_FOLDER_FLAGS = ("--queries_folder", "--database_folder")


def _parse_as_written(args):
    """The command's namespace, as the scripts parse it (a CPU stands in for a GPU; datasets and example folders
    need not exist)."""
    stand_ins = [REPO if previous in EXAMPLE_FOLDER_FLAGS else arg for previous, arg in zip([None, *args], args)]
    try:
        return vg_parser.parse_arguments(stand_ins + ["--device", "cpu"], require_dataset=False)
    except SystemExit as error:
        raise AssertionError(f"the flags do not parse (exit status {error.code}): {' '.join(args)}") from None


class Workspace:
    """The working folder of the README's commands, the smoke dataset, and tiny trained checkpoints per
    architecture (trained once, on demand)."""

    def __init__(self, work, datasets_folder):
        self.work, self.datasets_folder = work, datasets_folder
        self.checkpoints, self.lock, self.locks = {}, threading.Lock(), {}

    def run(self, command_line, timeout=600):
        environment = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run(command_line, cwd=self.work, capture_output=True, text=True, timeout=timeout,
                              env=environment)

    def training_folder(self, backbone, aggregation, fc_output_dim, l2):
        """The run folder of a tiny training of this architecture (in logs/default/, as README commands expect)."""
        key = (backbone, aggregation, fc_output_dim, l2)
        with self.lock:
            key_lock = self.locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self.checkpoints:
                flags = ["--backbone", backbone, "--aggregation", aggregation, "--l2", l2]
                flags += ["--fc_output_dim", str(fc_output_dim)] if fc_output_dim else []
                result = self.run([sys.executable, os.path.join(REPO, "train.py"), *SMOKE_DEFAULTS,
                                   "--datasets_folder", self.datasets_folder, "--dataset_name", SMOKE_DATASET,
                                   *SMOKE_FORCED, *flags])
                assert result.returncode == 0, result.stderr[-3000:]
                self.checkpoints[key] = _result_value(result.stdout, "run_folder")
            return self.checkpoints[key]

    def checkpoint(self, placeholder, namespace):
        # CRN starts from a NetVLAD of its backbone
        aggregation = "netvlad" if namespace.aggregation == "crn" else namespace.aggregation
        folder = self.training_folder(namespace.backbone, aggregation, namespace.fc_output_dim, namespace.l2)
        path = os.path.join(folder, os.path.basename(placeholder))
        assert os.path.isfile(path), f"{placeholder}: the tiny training left no {os.path.basename(placeholder)}"
        return path

    def vg_args(self, args):
        """train.py / eval.py arguments of the smoke form."""
        namespace = _parse_as_written(args)
        dataset_flags = {}
        smoke = list(SMOKE_DEFAULTS)
        for flag, values in _options(args):
            if flag in ("--datasets_folder", "--dataset_name"):
                dataset_flags[flag] = values[0]
                continue
            if flag == "--resume":
                if values[0].startswith(RUN_FOLDER_PLACEHOLDER):
                    values = [self.checkpoint(values[0], namespace)]
                else:
                    raise AssertionError(f"--resume {values[0]}: use {RUN_FOLDER_PLACEHOLDER}<file>.pth, or mark "
                                         "the command with `# needs ...`")
            elif flag == "--pca_dataset_folder":
                values = [SMOKE_DATASET + "/" + values[0].split("/", 1)[1]]
            elif flag in ("--queries_folder", "--database_folder"):
                subfolder = "queries" if flag == "--queries_folder" else "database"
                values = [os.path.join(self.datasets_folder, SMOKE_DATASET, "images", "test", subfolder)]
            elif flag == "--descriptors_folder":
                values = [os.path.join(self.work, "descriptors", os.path.basename(values[0].rstrip("/")))]
            smoke += [flag, *values]
        # A dataset that an earlier command built (tools/build_dataset.py) is used as it is
        folder, name = dataset_flags.get("--datasets_folder"), dataset_flags.get("--dataset_name")
        if folder and name and os.path.isdir(os.path.join(self.work, folder, name)):
            smoke += ["--datasets_folder", folder, "--dataset_name", name]
        else:
            smoke += ["--datasets_folder", self.datasets_folder, "--dataset_name", SMOKE_DATASET]
        smoke += SMOKE_FORCED + (["--pca_dim", SMOKE_PCA_DIM] if namespace.pca_dim is not None else [])
        return smoke

    def command_line(self, command):
        """The smoke form of a runnable command, as an argument list."""
        steps = plan(command)
        if steps.kind == "vg" and _asks_for_help(steps.args):
            return [sys.executable, os.path.join(REPO, steps.script), *steps.args]
        if steps.kind == "vg":
            script = [os.path.join(REPO, steps.script)]
            if steps.torchrun:
                script = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={TORCHRUN_PROCESSES}",
                          *script]
            return [sys.executable, *script, *self.vg_args(steps.args)]
        args = list(steps.args)
        if steps.script == "tools/build_dataset.py":
            args = [LUND_PHOTOS if previous == "--photos_folder" else arg
                    for previous, arg in zip([None] + args, args)]
        elif steps.script == "make_synthetic_dataset.py":
            args += SYNTHETIC_SMOKE_SIZES
        return [sys.executable, os.path.join(REPO, steps.script), *args]


def _result_value(stdout, key):
    lines = [line for line in stdout.splitlines() if line.startswith(results.RESULT_LINE_PREFIX)]
    assert lines, "no RESULT line"
    return results.parse_result_line(lines[-1])[key]


def _asks_for_help(args):
    return "-h" in args or "--help" in args


def _runnable(command):
    return command.marker is None and plan(command).kind in ("vg", "tool")


@pytest.fixture(scope="module")
def readme_runs(request, tmp_path_factory):
    """Every runnable README command in its smoke form: {line: (command line, CompletedProcess or error)}."""
    cache = getattr(request.config, "cache", None)
    datasets_folder = (str(cache.mkdir("synthetic_datasets")) if cache is not None
                       else str(tmp_path_factory.mktemp("data")))
    make_synthetic_dataset.generate_dataset(datasets_folder, SMOKE_DATASET, seed=3, overwrite=True,
                                            **SMOKE_DATASET_SIZES)
    workspace = Workspace(str(tmp_path_factory.mktemp("readme")), datasets_folder)
    # The default architecture first: logs/default/ then holds a run for the commands that read it
    workspace.training_folder("resnet18conv4", "netvlad", None, "before_pool")

    blocks = {}
    for command in COMMANDS:
        if _runnable(command):
            blocks.setdefault(command.block, []).append(command)

    def run_block(commands):
        outcomes = {}
        for command in commands:
            try:
                command_line = workspace.command_line(command)
                outcomes[command.line] = (command_line, workspace.run(command_line))
            except AssertionError as error:
                outcomes[command.line] = (None, error)
        return outcomes

    runs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for outcomes in pool.map(run_block, blocks.values()):
            runs.update(outcomes)
    return workspace, runs


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if _runnable(c)], ids=lambda c: c.id)
def test_readme_command_runs_in_its_smoke_form(readme_runs, command):
    _, runs = readme_runs
    command_line, outcome = runs[command.line]
    if isinstance(outcome, AssertionError):
        raise AssertionError(f"{command.id}: {command.text}\n{outcome}")
    assert outcome.returncode == 0, (f"{command.id}: {command.text}\nran as: {shlex.join(command_line)}\n"
                                     f"{outcome.stdout[-2000:]}\n{outcome.stderr[-3000:]}")
    if plan(command).kind == "vg" and not _asks_for_help(plan(command).args):
        assert os.path.isfile(os.path.join(_result_value(outcome.stdout, "run_folder"), "results.json"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.marker is not None and plan(c).kind == "vg"],
                         ids=lambda c: c.id)
def test_marked_commands_parse_and_name_real_models(command):
    namespace = _parse_as_written(plan(command).args)
    if namespace.resume is not None and not namespace.resume.startswith(RUN_FOLDER_PLACEHOLDER) \
            and not namespace.resume.endswith((".pth", ".pt")):
        entry = zoo.named_model(namespace.resume)  # the original's model zoo or a release of today's methods
        assert entry is not None, f"{command.id}: no model zoo model {namespace.resume}"
        flags = entry.flags()
        assert (namespace.backbone, namespace.aggregation) == (flags["backbone"], flags["aggregation"]), command.id


@pytest.mark.slow
def test_readme_outputs(readme_runs):
    """What the runnable commands leave: the custom dataset, the table and plot, predictions, descriptors."""
    workspace, _ = readme_runs
    work = workspace.work
    assert len(glob.glob(os.path.join(work, "data", "datasets", "my_city", "images", "test", "*", "*.jpg"))) == 29
    for name in ("results.md", "results.csv", "results.png"):
        assert os.path.isfile(os.path.join(work, name)), name
    assert glob.glob(os.path.join(work, "logs", "default", "*", "predictions", "predictions.csv"))
    assert glob.glob(os.path.join(work, "logs", "default", "*", "queries_descriptors.npy"))
    assert os.path.isfile(os.path.join(work, "descriptors", "sfxl_descriptors", "database", "manifest.json"))


# ----------------------------------------------------------------------------------------------------------
# Content: the original's sections, the model zoo tables, the layout

# The headings of the original's README (without its title and table of contents)
ORIGINAL_SECTIONS = ("Setup", "Running experiments", "Basic experiment", "Architectures and mining",
                     "Add a fully connected layer", "Add PCA", "Evaluate trained models", "Reproduce the results",
                     "Resize", "Query pre/post-processing and predictions refinement", "Data augmentation",
                     "Off-the-shelf models trained on Landmark Recognition datasets",
                     "Using pretrained networks on other datasets", "Changing the threshold distance",
                     "Changing the recall values (R@N)", "Model Zoo", "Acknowledgements")


def _headings(text):
    return [re.sub(r"\s+", " ", match).strip() for match in re.findall(r"^#{2,4} (.+)$", text, re.M)]


def test_every_section_of_the_original_has_its_counterpart():
    headings = _headings(README_TEXT)
    assert not [section for section in ORIGINAL_SECTIONS if section not in headings]
    for section in ("Performance", "Troubleshooting", "Running the tests", "Layout", "Citation",
                    "Reproducing the paper: sweep scripts", "Custom datasets"):
        assert section in headings


def test_links_within_the_readme_lead_to_its_headings():
    def anchor(heading):  # GitHub's: lower case, punctuation dropped, spaces to hyphens
        return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    anchors = {anchor(heading) for heading in re.findall(r"^#{1,4} (.+)$", README_TEXT, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README_TEXT)
    assert len(links) > 20
    assert not [link for link in links if link not in anchors]


def test_model_zoo_tables_match_model_zoo():
    linked = re.findall(r"\[`([\w-]+)`\]\((https://drive\.google\.com/file/d/[\w-]+/view)\)", README_TEXT)
    assert linked
    for name, link in linked:
        assert name in zoo.MODEL_ZOO, name
        assert zoo.MODEL_ZOO[name].link == link, name
    assert set(zoo.MODEL_ZOO) == {name for name, _ in linked}


def _layout_paths():
    section = README_TEXT.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| ([^|]+) \|", section, re.M)
    return [path for cell in first_cells for path in re.findall(r"`([^`]+)`", cell)]


def test_layout_lists_the_repository():
    listed = _layout_paths()
    assert not [path for path in listed if not os.path.exists(os.path.join(REPO, path))]
    folders = [path for path in listed if path.endswith("/")]
    files = [os.path.relpath(path, REPO) for pattern in ("*.py", "*.sh", "model/*.py", "tools/*", "benchmarks/*.py")
             for path in glob.glob(os.path.join(REPO, pattern)) if os.path.isfile(path)]
    unlisted = [path for path in files if path not in listed and os.path.basename(path) != "__init__.py"
                and not any(path.startswith(folder) for folder in folders)]
    assert not unlisted, f"files missing from the README's Layout section: {unlisted}"
