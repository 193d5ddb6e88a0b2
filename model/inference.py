"""The one loop that runs a model over a DataLoader: evaluation mode is the caller's choice; no gradients,
optional autocast, a progress bar."""
import torch

from commons import progress_bar


def forward_batches(model, loader, device, autocast_dtype=None, description=None):
    """Yield (outputs, indices) for each (images, indices) batch of `loader`, without gradients. Images
    [b, crops, 3, H, W] (crop test methods) go through the model as b * crops images, the crops of an image
    contiguous, and their outputs come back as [b, crops, ...]. With `autocast_dtype`, the forward pass runs in
    that reduced precision (outputs as computed)."""
    device = torch.device(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for images, indices in progress_bar(loader, description):
            crops_num = images.shape[1] if images.dim() == 5 else None
            outputs = model(images.flatten(0, 1).to(device, non_blocking=True) if crops_num else
                            images.to(device, non_blocking=True))
            if crops_num is not None:
                outputs = outputs.reshape(len(indices), crops_num, *outputs.shape[1:])
            yield outputs, indices
