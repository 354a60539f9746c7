"""``densenet cam``."""

from __future__ import annotations

from ..cam import (CAPTION_HEIGHT, METHODS, cam_for_images, cam_for_volumes, check_out_dir,
                   check_out_path, render_panels)
from ..devices import resolve_device
from ..errors import UsageError
from ..inference import load_for_inference
from ..volumes import VOLUME_EXTENSIONS, is_volume_file
from .types import DEVICES, add_image_source, images_and_source, positive_int


def _cmd_cam(args) -> int:
    images_and_source(args, "explain")
    if args.method == "gradcam" and (args.patch is not None or args.stride is not None):
        raise UsageError("--patch and --stride set the occlusion patch; add --method occlusion "
                         "(Grad-CAM has no patch).")
    volumes = [p for p in args.images if is_volume_file(p)]
    if volumes and len(volumes) != len(args.images):
        image = next(p for p in args.images if not is_volume_file(p))
        raise UsageError(f"give either image files or volume files ({', '.join(VOLUME_EXTENSIONS)}), "
                         f"not both: {volumes[0]} is a volume and {image} is not.")
    loaded = load_for_inference(args.source, weights=args.weights, model=args.model)
    volume_model = loaded.pre.kind == "volume"
    if volumes and not volume_model:
        raise UsageError(f"{volumes[0]} is a volume but the model in {loaded.source} was trained "
                         f"on 2-D images; give it image files.")
    if volume_model and not volumes:
        raise UsageError(f"{args.images[0]} is not a volume file but the model in {loaded.source} "
                         f"was trained on volumes; give it {', '.join(VOLUME_EXTENSIONS)} files.")
    if volume_model:
        return _volume_cams(args, loaded)
    out = check_out_path(args.out)  # before any work
    results = cam_for_images(loaded, args.images, args.class_name,
                             device=resolve_device(args.device), **_method(args))
    render_panels([r.image for r in results], [r.cam for r in results],
                  [r.caption for r in results], out, args.size)
    for r in results:
        print(f"{r.path}  {r.class_name}  {r.probability:.4f}")
    print(f"wrote {out} ({len(results) * args.size}x{args.size + CAPTION_HEIGHT} px)")
    return 0


def _volume_cams(args, loaded) -> int:
    out = check_out_dir(args.out)
    results = cam_for_volumes(loaded, args.images, out, args.class_name,
                              device=resolve_device(args.device), size=args.size, **_method(args))
    for r in results:
        peak = "none" if r.peak is None else ",".join(map(str, r.peak))
        print(f"{r.path}  {r.class_name}  {r.probability:.4f}  peak {peak}  {r.png}  {r.nifti}")
    print(f"wrote {len(results)} figure(s) ({3 * args.size}x{args.size + 2 * CAPTION_HEIGHT} px) "
          f"and NIfTI heat map(s) to {out}")
    return 0


def _method(args) -> dict:
    return {"method": args.method, "patch": args.patch, "stride": args.stride}


def register(sub) -> None:
    p = sub.add_parser("cam", help="Grad-CAM or occlusion heat maps: where the model looks in "
                       "image or volume files",
                       description="Grad-CAM (Selvaraju et al., ICCV 2017) of the last dense "
                       "block for each image, preprocessed as 'densenet predict' does: one PNG "
                       "with a panel per image (the heat map blended over the resized/cropped "
                       "image, and a caption with the class and its probability). For a model "
                       "trained on volumes (.nii, .nii.gz, .npy, .npz), --out is a folder that "
                       "gets, per volume and class, NAME_CLASS_cam.png (three orthogonal slices "
                       "through the map's maximum) and NAME_CLASS_cam.nii.gz (the map, the model "
                       "input's shape, to open over the scan in a viewer). --method occlusion "
                       "draws occlusion sensitivity instead (Zeiler & Fergus, ECCV 2014): the fall "
                       "in the class's probability when a patch of the input is covered with its "
                       "mean, one forward pass per patch position (volumes: "
                       "NAME_CLASS_occlusion.*).")
    add_image_source(p)
    p.add_argument("--out", required=True, metavar="FILE.png|FOLDER",
                   help="images: the PNG to write, (number of images x SIZE) x (SIZE + "
                        f"{CAPTION_HEIGHT}) pixels; volumes: the folder for the PNG and NIfTI "
                        "heat maps (created when missing)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class in every image or volume (default: each one's top class; "
                        "multi-label: each label over its threshold)")
    p.add_argument("--size", type=positive_int, default=224,
                   help="panel width and height in pixels (64 to 2048; default 224)")
    p.add_argument("--method", default="gradcam", choices=METHODS,
                   help="gradcam: Grad-CAM of the last block (default, one backward pass); "
                        "occlusion: cover one patch at a time and map the fall in the class's "
                        "probability (one forward pass per patch position)")
    p.add_argument("--patch", type=positive_int, metavar="N",
                   help="occlusion: the patch side in voxels (pixels) of the model's input "
                        "(default: a quarter of each side for volumes, an eighth for images)")
    p.add_argument("--stride", type=positive_int, metavar="N",
                   help="occlusion: the step between patch positions, at most the patch (default: half "
                        "the patch)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.set_defaults(func=_cmd_cam)
