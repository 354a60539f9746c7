"""``densenet cam``."""

from __future__ import annotations

from ..cam import CAPTION_HEIGHT, cam_for_images, check_out_path, render_panels
from ..devices import resolve_device
from ..inference import load_for_inference
from .types import DEVICES, add_image_source, images_and_source, positive_int


def _cmd_cam(args) -> int:
    images_and_source(args, "explain")
    out = check_out_path(args.out)  # before any work
    loaded = load_for_inference(args.source, weights=args.weights, model=args.model)
    results = cam_for_images(loaded, args.images, args.class_name,
                             device=resolve_device(args.device))
    render_panels([r.image for r in results], [r.cam for r in results],
                  [r.caption for r in results], out, args.size)
    for r in results:
        print(f"{r.path}  {r.class_name}  {r.probability:.4f}")
    print(f"wrote {out} ({len(results) * args.size}x{args.size + CAPTION_HEIGHT} px)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("cam", help="Grad-CAM heat maps: where the model looks in image files",
                       description="Grad-CAM (Selvaraju et al., ICCV 2017) of the last dense "
                       "block for each image, preprocessed as 'densenet predict' does: one PNG "
                       "with a panel per image (the heat map blended over the resized/cropped "
                       "image, and a caption with the class and its probability).")
    add_image_source(p)
    p.add_argument("--out", required=True, metavar="FILE.png",
                   help="the PNG to write: (number of images x SIZE) x (SIZE + "
                        f"{CAPTION_HEIGHT}) pixels")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class in every image (default: each image's top class)")
    p.add_argument("--size", type=positive_int, default=224,
                   help="panel width and height in pixels (64 to 2048; default 224)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.set_defaults(func=_cmd_cam)
