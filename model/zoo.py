"""Where released weights live: other pretrainings, off-the-shelf retrieval models, the trained model zoo.

Identifiers as the original benchmark uses them (Google Drive ids, URLs, file names). Downloading and
loading are in util.py; this file only holds the tables.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional


def google_drive_link(file_id):
    return f"https://drive.google.com/file/d/{file_id}/view"


# --pretrain: the weights a backbone starts from ("none": random initialisation)
PRETRAININGS = ("imagenet", "places", "gldv2", "none")

# ----------------------------------------------------------------------------------------------------------
# --pretrain places | gldv2: torchvision classification models (365 / 512 classes), saved by the original
# as <weights folder>/pretrained_nets/<name>.pth

PRETRAINED_NETS_SUBFOLDER = "pretrained_nets"
PRETRAIN_NUM_CLASSES = {"places": 365, "gldv2": 512}
PRETRAINED_NETS_GOOGLE_DRIVE_IDS = {
    "resnet18_places": "1DnEQXhmPxtBUrRc81nAvT8z17bk-GBj5",
    "resnet50_places": "1zsY4mN4jJ-AsmV3h4hjbT72CBfJsgSGC",
    "resnet101_places": "1E1ibXQcg7qkmmmyYgmwMTh7Xf1cDNQXa",
    "vgg16_places": "1UWl1uz6rZ6Nqmp1K5z3GHAIZJmDh4bDu",
    "resnet18_gldv2": "1wkUeUXFXuPHuEvGTXVpuP5BMB-JJ1xke",
    "resnet50_gldv2": "1UDUv6mszlXNC1lv6McLdeBNMq9-kaA70",
    "resnet101_gldv2": "1apiRxMJpDlV0XmKlC5Na_Drg2jtGL-uE",
    "vgg16_gldv2": "10Ov9JdO7gbyz6mB5x0v_VSAUMj91Ta4o",
}

# ----------------------------------------------------------------------------------------------------------
# --off_the_shelf: ResNet conv5 + GeM + FC 2048 models trained for landmark retrieval, stored under
# <weights folder>/off_the_shelf_nets/

OFF_THE_SHELF_SUBFOLDER = "off_the_shelf_nets"
MODEL_ZOO_SUBFOLDER = "model_zoo"  # checkpoints that --resume names, downloaded once
# Radenovic (cnnimageretrieval-pytorch): the name's last field is the start of the file's SHA-256
OFF_THE_SHELF_RADENOVIC_URLS = {
    ("resnet50conv5", "sfm"): "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/"
                              "rSfM120k-tl-resnet50-gem-w-97bf910.pth",
    ("resnet101conv5", "sfm"): "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/"
                               "rSfM120k-tl-resnet101-gem-w-a155e54.pth",
    ("resnet50conv5", "gldv1"): "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/gl18/"
                                "gl18-tl-resnet50-gem-w-83fdc30.pth",
    ("resnet101conv5", "gldv1"): "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/gl18/"
                                 "gl18-tl-resnet101-gem-w-a4d43db.pth",
}


@dataclass(frozen=True)
class NaverModel:
    google_drive_id: str  # a zip holding `file_name`
    file_name: str


# Naver (deep-image-retrieval)
OFF_THE_SHELF_NAVER = {
    "resnet50conv5": NaverModel("1oPtE_go9tnsiDLkWjN4NMpKjh-_md1G5", "Resnet50-AP-GeM.pt"),
    "resnet101conv5": NaverModel("1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy", "Resnet-101-AP-GeM.pt"),
}
# What these models are: the flags that build the matching architecture
OFF_THE_SHELF_BACKBONES = ("resnet50conv5", "resnet101conv5")
OFF_THE_SHELF_AGGREGATION = "gem"
OFF_THE_SHELF_FC_OUTPUT_DIM = 2048


# ----------------------------------------------------------------------------------------------------------
# Model zoo: the trained checkpoints of the original README, by name, for --resume

@dataclass(frozen=True)
class ZooModel:
    google_drive_id: str
    backbone: str
    aggregation: str
    train_set: str  # "pitts30k" or "msls"
    mining: Optional[str] = None  # only the README's mining table states it
    fc_output_dim: Optional[int] = None
    resize: Optional[tuple] = None  # transformers are trained at one size

    @property
    def link(self):
        return google_drive_link(self.google_drive_id)

    def flags(self):
        """The flags that build this model's architecture."""
        flags = {"backbone": self.backbone, "aggregation": self.aggregation}
        if self.fc_output_dim is not None:
            flags["fc_output_dim"] = self.fc_output_dim
        if self.resize is not None:
            flags["resize"] = list(self.resize)
        return flags


# The README's "resnet18/50/101" models are the default cut of the benchmark, conv4.
_ARCHITECTURES = {"resnet18": "resnet18conv4", "resnet50": "resnet50conv4", "resnet101": "resnet101conv4",
                  "vgg16": "vgg16", "cct384": "cct384", "vit224": "vit"}
_RESIZES = {"cct384": (384, 384), "vit224": (224, 224)}

# (README model name, Google Drive id trained on pitts30k, id trained on msls); None where not released.
# Names are "<model>-<training set>", or "<model>-<mining>-<training set>" for the mining table.
_README_TABLES = [
    # Backbones and aggregations tables
    ("vgg16-gem", "1-e9v_mynIX5XBsdtN_mG9tz5-nA5PWiq", "1GqgO-qG-WNJXWty43KgvDtW0OpG0Wrq-"),
    ("resnet18-gem", "1R66NYeLlxBIqLviUVL9XPZkrtmyMn_tU", "1IH0d_ME2kU3pagsKhx5ZfRfyWriErajn"),
    ("resnet50-gem", "1esgXzRFvDFHrMnwwR3GlTnErXjFNrYV7", "1uuIYJN4N7lQqqsN32pbZwjhz5Xvv3zr-"),
    ("resnet101-gem", "1Sd-sezmbzOGbZcy3eqRnWH07eoJ7CM0X", "1Iondvd8P3vb3piHFTA-RUgTFpqh0I31M"),
    ("vgg16-netvlad", "14s7OZor6wrlGBKeXr0vKbPfTzlW9preM", "1dwai3uNudjvns58JIyaf5CBRg4ojcWIW"),
    ("resnet18-netvlad", "1KFwonDQYdvzTAIILsOMjmLRUR76jXXvB", "1_Ozq2TdvwLAJUwy7YH9l69GsfOU-MlFZ"),
    ("resnet50-netvlad", "1KL8HoAApOjJFETin7Q7u7IcsOvroKlSj", "1krf0A6CeW8GqLqHWZ7dlSNJ9aTJ4dotF"),
    ("resnet101-netvlad", "1064kDJ0LPyWoU7J4bMvAa0lTNEhAEi8v", "1rtPfsgfJ2Zoxs5uu7Ph1_qc7q-hIxJek"),
    ("cct384-netvlad", "1Rx0oG4PG9bEraIg4y7e6Z24Q6b_TGr5u", "1wDZ6XRVYz6bcGe_p3Iiz2NfIe9MmZZMN"),
    ("vit224-cls", None, "1mPiIqFKnW1HWtXqKJhLLmIgMWoV14auG"),
    # The README links the same pitts30k file for resnet50-gem-fc2048 and resnet50-netvlad-partial;
    # loading tells which one it is (the keys of a NetVLAD and of a GeM+FC model differ).
    ("resnet50-gem-fc2048", "1GCbE4gzcRXMH8ETD2YCPo0I3suAXDr-y", "1oSf11wAxaoEbjLnjfX0EWZ65dgccwdDD"),
    ("resnet50-gem-fc65536", "19GjodUuAGKpac6WhIcfuy3tiPV1J-ikn", "1OGwt651loL2vXnQYyABqitL39IEiXhag"),
    ("resnet50-crn", "1mLOkILfIf8Wegi3tva9390TRIbWDxRor", "1KJzXwCsbyT0uNDl925H2J0QKXhKaeEgW"),
    # Mining table
    ("resnet18-gem-random", "12Ds-LcvFcA609bZVBTLNjAZIzV-g8UGK", "1oNZyfjTaulVTFX4wRrj0YISqxLuNRyhy"),
    ("resnet18-gem-full", "1bHVsnb6Km2npBsGK9ylI1vuOuc3WLKJb", "1BbANLPVPxWDau2RP0cWTSS3FybbyUPL1"),
    ("resnet18-gem-partial", "1R66NYeLlxBIqLviUVL9XPZkrtmyMn_tU", "1IH0d_ME2kU3pagsKhx5ZfRfyWriErajn"),
    ("resnet18-netvlad-random", "19OcEe2ckk-D8drrmxpKkkarT_5mCkjnt", "1JlEbKbnWyCbR4zP1ZYDct3pYtuJrUmVp"),
    ("resnet18-netvlad-full", "1kwgyDEfRYtdaOEimQQlmj77rIR2tH3st", None),
    ("resnet18-netvlad-partial", "1KFwonDQYdvzTAIILsOMjmLRUR76jXXvB", "1_Ozq2TdvwLAJUwy7YH9l69GsfOU-MlFZ"),
    ("resnet50-gem-random", "1f9be75EaG0fFLeNF0bufSre_efKH_ObU", "1h9-av6qMn-LVapI5KA4cZhT5BKaZ79C6"),
    ("resnet50-gem-full", "1quS9ZjOrXBqNDBhQzlSj8aeh3dBfP1GY", "1pxU881eTcz_YdQthKz5yohU7WoLpXt8J"),
    ("resnet50-gem-partial", "1esgXzRFvDFHrMnwwR3GlTnErXjFNrYV7", "1uuIYJN4N7lQqqsN32pbZwjhz5Xvv3zr-"),
    ("resnet50-netvlad-random", "1TkzlO-ZS42u6e783y2O3JZhcIoI7CEVj", "1E_X2nrnLxBqvLfVfNKtorOGW_VmwOqSu"),
    ("resnet50-netvlad-full", "133uxEJZ0gK6XL1myhSAFC7wibZtWnugK", None),
    ("resnet50-netvlad-partial", "1GCbE4gzcRXMH8ETD2YCPo0I3suAXDr-y", "1krf0A6CeW8GqLqHWZ7dlSNJ9aTJ4dotF"),
]
MINING_NAMES = ("random", "full", "partial")


def _parse_readme_name(model_name):
    """'resnet50-gem-fc2048' -> (backbone, aggregation, fc_output_dim, mining, resize)."""
    fields = model_name.split("-")
    architecture, aggregation, rest = fields[0], fields[1], fields[2:]
    fc_output_dim = int(rest.pop(0)[len("fc"):]) if rest and rest[0].startswith("fc") else None
    mining = rest.pop(0) if rest and rest[0] in MINING_NAMES else None
    assert not rest, f"unparsed model zoo name {model_name}"
    return _ARCHITECTURES[architecture], aggregation, fc_output_dim, mining, _RESIZES.get(architecture)


def _build_model_zoo():
    zoo = {}
    for model_name, pitts30k_id, msls_id in _README_TABLES:
        backbone, aggregation, fc_output_dim, mining, resize = _parse_readme_name(model_name)
        for train_set, file_id in (("pitts30k", pitts30k_id), ("msls", msls_id)):
            if file_id is not None:
                zoo[f"{model_name}-{train_set}"] = ZooModel(file_id, backbone, aggregation, train_set,
                                                            mining, fc_output_dim, resize)
    return zoo


MODEL_ZOO = _build_model_zoo()


# ----------------------------------------------------------------------------------------------------------
# Today's methods: their authors' released files, by name for --resume ("<method>-<backbone>-<descriptor size>"),
# loaded as they are published (their key layouts are declared by the parts they map onto)

@dataclass(frozen=True)
class Release:
    """A released model: its file (from a URL, a Google Drive file, or a file in a Google Drive folder), the flags
    that build its architecture, and the image size its authors evaluate at (None: any size)."""
    method: str
    file_name: str
    architecture: dict
    resize: Optional[tuple] = None
    url: Optional[str] = None
    google_drive_id: Optional[str] = None
    google_drive_folder: Optional[str] = None

    @property
    def link(self):
        return self.url or (google_drive_link(self.google_drive_id) if self.google_drive_id
                            else self.google_drive_folder)

    def flags(self):
        """The flags that build this model's architecture, and its evaluation --resize."""
        return dict(self.architecture, **({"resize": list(self.resize)} if self.resize else {}))


_COSPLACE_BACKBONES = {"vgg16": ("VGG16", "vgg16"), "resnet18": ("ResNet18", "resnet18conv5"),
                       "resnet50": ("ResNet50", "resnet50conv5"), "resnet101": ("ResNet101", "resnet101conv5"),
                       "resnet152": ("ResNet152", "resnet152conv5")}
# Descriptor sizes released per backbone (checkpoints.md; the two EigenPlaces 1024 files are listed by its hubconf)
_COSPLACE_DIMS = {"vgg16": (64, 128, 256, 512), "resnet18": (32, 64, 128, 256, 512),
                  "resnet50": (32, 64, 128, 256, 512, 1024, 2048), "resnet101": (32, 64, 128, 256, 512, 1024, 2048),
                  "resnet152": (32, 64, 128, 256, 512, 1024, 2048)}
_EIGENPLACES_DIMS = {"vgg16": (512,), "resnet18": (256, 512), "resnet50": (128, 256, 512, 1024, 2048),
                     "resnet101": (128, 256, 512, 1024, 2048)}
_MIXVPR = {4096: ("1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L", 1024, 4), 512: ("1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj", 256, 2),
           128: ("1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz", 64, 2)}
_CONVAP_FOLDER = "https://drive.google.com/drive/folders/1VYPw9uGD11NgiGFgfWueLt3noJYOIuhL"
_BOQ = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/"
_DINOV2_SALAD = {"backbone": "dinov2_vitb14", "salad_clusters": 64, "salad_token_dim": 256}


def _cosplace_like(method, dims, url_pattern):
    releases = {}
    for backbone, backbone_dims in dims.items():
        file_backbone, flag_backbone = _COSPLACE_BACKBONES[backbone]
        for dim in backbone_dims:
            file_name = f"{file_backbone}_{dim}_{method}.pth"
            releases[f"{method}-{backbone}-{dim}"] = Release(
                {"cosplace": "CosPlace", "eigenplaces": "EigenPlaces"}[method], file_name,
                {"backbone": flag_backbone, "aggregation": "gem", "fc_output_dim": dim},
                url=url_pattern.format(file_name))
    return releases


def _build_releases():
    releases = {
        **_cosplace_like("cosplace", _COSPLACE_DIMS, "https://github.com/gmberton/CosPlace/releases/download/v1.0/{}"),
        **_cosplace_like("eigenplaces", _EIGENPLACES_DIMS,
                         "https://github.com/gmberton/EigenPlaces/releases/download/v1.0/{}"),
    }
    for dim, (file_id, channels, rows) in _MIXVPR.items():
        releases[f"mixvpr-resnet50-{dim}"] = Release(
            "MixVPR", f"resnet50_MixVPR_{dim}_channels({channels})_rows({rows}).ckpt",
            {"backbone": "resnet50conv4", "aggregation": "mixvpr", "mixvpr_out_channels": channels,
             "mixvpr_out_rows": rows}, (320, 320), google_drive_id=file_id)
    for channels in (2048, 1024, 512, 128):
        releases[f"convap-resnet50-{4 * channels}"] = Release(
            "Conv-AP", f"resnet50_ConvAP_{channels}_2x2.ckpt",
            {"backbone": "resnet50conv5", "aggregation": "convap", "convap_out_channels": channels},
            (320, 320), google_drive_folder=_CONVAP_FOLDER)
    releases["boq-resnet50-16384"] = Release(
        "BoQ", "resnet50_16384.pth", {"backbone": "resnet50conv4", "aggregation": "boq", "boq_proj_channels": 512},
        (384, 384), url=_BOQ + "resnet50_16384.pth")
    releases["boq-dinov2-12288"] = Release(
        "BoQ", "dinov2_12288.pth", {"backbone": "dinov2_vitb14", "aggregation": "boq", "boq_proj_channels": 384},
        (322, 322), url=_BOQ + "dinov2_12288.pth")
    releases["salad-dinov2-8448"] = Release(
        "SALAD", "dino_salad.ckpt", dict(_DINOV2_SALAD, aggregation="salad", salad_cluster_dim=128), (322, 322),
        url="https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt")
    releases["megaloc-dinov2-8448"] = Release(
        "MegaLoc", "model.safetensors",
        dict(_DINOV2_SALAD, aggregation="megaloc", salad_cluster_dim=256, fc_output_dim=8448),
        url="https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors")
    # The first release's file (February 2025 - January 2026 code), another key layout of the same model
    releases["megaloc-v1-dinov2-8448"] = dataclasses.replace(
        releases["megaloc-dinov2-8448"], file_name="megaloc.torch",
        url="https://github.com/gmberton/MegaLoc/releases/download/v1.0/megaloc.torch")
    return releases


RELEASES = _build_releases()


def named_model(name):
    """The model-zoo entry (the original's or a release of today's methods) that --resume names, or None."""
    return MODEL_ZOO.get(name) or RELEASES.get(name)
