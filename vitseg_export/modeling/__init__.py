"""checkpoint -> nn.Module: the model families and their registry. Importing this package registers the
built-in families (ViT, SegFormer); a family of your own registers itself the same way."""

from vitseg_export.modeling import segformer, vit  # noqa: F401  (registration)
