"""Fake (meta) kernels: output shapes without data, so the ops trace under torch.compile."""

import torch

from . import _library

if _library.loaded:

    @torch.library.register_fake("transfer_fast::multi_tensor_distance")
    def _(anchors, targets, num_tensors):
        if num_tensors == 0:
            return torch.empty((0, 0, 0, 5), dtype=torch.float64)
        return anchors[0].new_empty(
            (len(anchors) // num_tensors, len(targets) // num_tensors, num_tensors, 5),
            dtype=torch.float64,
        )

    @torch.library.register_fake("transfer_fast::channel_stats")
    def _(x, shift, labels, num_classes, channels_last):
        channels = x.shape[2] if channels_last else x.shape[1]
        return (x.new_empty((num_classes,), dtype=torch.float64),
                x.new_empty((num_classes, channels), dtype=torch.float64),
                x.new_empty((num_classes, channels), dtype=torch.float64))

    @torch.library.register_fake("transfer_fast::packed_distance")
    def _(anchors, targets, chunks, num_tensors):
        return anchors.new_empty((anchors.shape[0], targets.shape[0], num_tensors, 5),
                                 dtype=torch.float64)

    @torch.library.register_fake("transfer_fast::packed_chunks")
    def _(offsets, numels):
        return offsets.new_empty((torch.library.get_ctx().new_dynamic_size(), 3))
