"""Export a checkpoint's SWA weights for Paddle Inference, checked against the dynamic model.

    python scripts/export.py --model_path runs/digits/checkpoint-60.pdparams --out exported/digits

Writes PREFIX.json (the program) and PREFIX.pdiparams (the weights) with paddle.jit.save.
The exported model takes float32 images in NCHW layout holding the dataset's raw pixel values
(0..255 for CIFAR and MNIST, 0..16 for digits, as their files hold them), of the checkpoint's
dataset's shape with any batch size, and returns logits: the scaling and the per-channel
normalisation the model was trained with are part of it. The average's BatchNorm statistics
are recomputed first if the checkpoint's are stale. Before it returns, Paddle Inference's
predictor must give the dynamic model's logits on a test batch. --fold_bn folds each
BatchNorm that directly follows a convolution into it (fewer operations at inference).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Paddle's C++ side logs each graph pass and warning while saving and loading a program;
# only errors are worth a user's eye here (set before Paddle starts its logging).
os.environ.setdefault("GLOG_minloglevel", "2")

import harness  # noqa: E402

harness.prepare()  # before Paddle loads: the math library's path, Paddle's import-time warnings
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from harness import checkpoints, cli, errors  # noqa: E402
from harness import data as datasets  # noqa: E402
from harness import scoring  # noqa: E402


class Normalized(paddle.nn.Layer):
    """`model` fed raw pixels, scaled to [0, 1] as the loader scales them and normalised with
    (x - mean) / std per channel: what the exported program runs."""

    def __init__(self, model, mean, std, pixel_max=255):
        super().__init__()
        self.model, self.pixel_max = model, pixel_max
        shape = [1, len(mean), 1, 1]
        self.register_buffer("mean", paddle.to_tensor(np.asarray(mean, np.float32).reshape(shape)))
        self.register_buffer("std", paddle.to_tensor(np.asarray(std, np.float32).reshape(shape)))

    def forward(self, x):
        if self.pixel_max != 255:  # as data.py brings other scales to 0..255: floor(x * 255 / max)
            x = paddle.floor(x * (255.0 / self.pixel_max))
        return self.model((x / 255.0 - self.mean) / self.std)


def fold_batch_norm(model):
    """Fold every BatchNorm2D that directly follows a Conv2D in a Sequential into the
    convolution (eval-mode arithmetic: the same outputs up to rounding). Returns the count."""
    folded = 0
    for layer in model.sublayers(include_self=True):
        if not isinstance(layer, paddle.nn.Sequential):
            continue
        names = list(layer._sub_layers)
        for first, second in zip(names, names[1:]):
            conv, bn = layer._sub_layers[first], layer._sub_layers[second]
            if isinstance(conv, paddle.nn.Conv2D) and isinstance(bn, paddle.nn.BatchNorm2D) \
                    and conv._data_format == bn._data_format == "NCHW":
                layer._sub_layers[first] = _folded(conv, bn)
                layer._sub_layers[second] = paddle.nn.Identity()
                folded += 1
    return folded


def _folded(conv, bn):
    scale = bn.weight / paddle.sqrt(bn._variance + bn._epsilon)
    bias = conv.bias if conv.bias is not None else paddle.zeros([conv._out_channels])
    new = paddle.nn.Conv2D(conv._in_channels, conv._out_channels, conv._kernel_size,
                           stride=conv._stride, padding=conv._padding, dilation=conv._dilation,
                           groups=conv._groups)
    with paddle.no_grad():
        new.weight.set_value(conv.weight * scale.reshape([-1, 1, 1, 1]))
        new.bias.set_value((bias - bn._mean) * scale + bn.bias)
    return new


def predictor_logits(prefix, x):
    """Logits of the exported files for batch `x` (numpy), through Paddle Inference."""
    import paddle.inference as inference

    config = inference.Config(prefix + ".json", prefix + ".pdiparams")
    config.disable_glog_info()
    if paddle.get_device() == "cpu":
        config.disable_gpu()
    predictor = inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(x.shape))
    handle.copy_from_cpu(x)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def build_parser():
    p = cli.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True, metavar="CKPT", type=cli.path_argument,
                   help="checkpoint written by train.py (required)")
    p.add_argument("--out", required=True, metavar="PREFIX", type=cli.path_argument,
                   help="path prefix of the files to write, e.g. exported/model (required)")
    p.add_argument("--sgd", action="store_true", help="export the SGD weights (default: SWA's)")
    p.add_argument("--fold_bn", action="store_true",
                   help="fold BatchNorm into the convolution before it, where one directly "
                        "follows another (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files (default: off)")
    cli.add_checkpoint_overrides(p, "the checkpoint's")
    return p


def export(args):
    if not os.path.basename(args.out) or os.path.isdir(args.out):
        raise errors.UsageError(f"--out {args.out} names a folder; give a path prefix in it, "
                                f"e.g. {os.path.join(args.out, 'model')}")
    ckpt = checkpoints.load_checkpoint(args.model_path)  # a bad checkpoint creates nothing
    outputs = [args.out + ".json", args.out + ".pdiparams"]
    for path in outputs:  # makes the folder, as train.py makes --dir
        cli.check_output(path, "--out", args.overwrite, what="path prefix")
    trained = checkpoints.rebuild(ckpt, args.model_path, args.model, args.dataset,
                                  args.data_path, args.batch_size, args.device, args.threads)
    model, ds = trained.model, trained.ds
    weights = "SGD" if args.sgd or not ckpt.has_average else "SWA"
    scoring.evaluate_weights(trained, ckpt, weights, args.model_path)  # loads, refreshes if stale
    network = Normalized(model, ds.mean, ds.std, datasets.pixel_max(ds.name))
    network.eval()
    x = datasets.raw_test_images(ds)[:64].astype(np.float32).transpose(0, 3, 1, 2)
    with paddle.no_grad():
        dynamic = network(paddle.to_tensor(x)).numpy()  # before folding: folding is checked too
    folded = fold_batch_norm(model) if args.fold_bn else 0
    channels, height, width = ds.image_shape
    spec = [paddle.static.InputSpec([None, channels, height, width], "float32", "image")]
    staging = f"{args.out}.{os.getpid()}.tmp"  # renamed into place once checked
    try:
        paddle.jit.save(network, staging, input_spec=spec)
        exported = predictor_logits(staging, x)
        worst = float(np.abs(exported - dynamic).max())
        if not np.allclose(exported, dynamic, rtol=1e-4, atol=1e-4):
            raise errors.RunFailed(f"Paddle Inference's logits differ from the dynamic model's by up "
                                   f"to {worst:.3g}; nothing was written")
        for path in outputs:
            os.replace(staging + path[len(args.out):], path)
    finally:
        for suffix in (".json", ".pdiparams", ".pdmodel"):
            if os.path.exists(staging + suffix):
                os.unlink(staging + suffix)
    return weights, folded, outputs, worst, len(x)


def run(argv):
    args = build_parser().parse_args(argv)
    weights, folded, outputs, worst, count = export(args)
    print(f"exported the {weights} weights" + (f" ({folded} BatchNorm layers folded)" if folded else "")
          + f": {', '.join(outputs)}")
    print(f"checked: Paddle Inference's logits on {count} test images equal the dynamic model's "
          f"(largest difference {worst:.2g})")
    return 0


def main(argv=None):
    return cli.main("export.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
