"""Plain nn.Module velocity / noise networks. No Lightning inside.

Every network is called as ``net(z, t, cond=None) -> tensor shaped like z`` where ``t`` is a
float tensor of shape (batch,) in [0, 1] (t = 0 data, t = 1 noise) and ``cond`` is whatever the
data module yields as the condition (None, a label tensor, or a dict of text encodings).
A conditional network drops its condition itself during training (for classifier-free guidance)
and offers ``null_condition(cond)``: the unconditional counterpart of a batch's condition.

Every network declares what it takes: ``conditioning`` (a ConditioningSpec: class labels, pooled
vector, token streams; see conditioning.py, whose ``check_fits`` compares it with the data),
``in_channels`` and ``patch_size``. The image backbones (DiT, CrossDiT, MM-DiT) share one trunk
(trunk.py: patches and positions -> blocks -> final adaLN layer -> unpatchify) and differ only in
their blocks and in how they embed their condition. Parameter counts: ``layers.count_parameters``
builds the network on the meta device.
"""
