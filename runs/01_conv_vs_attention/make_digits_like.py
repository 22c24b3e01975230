"""Write a small "digits-like" ImageFolder: 8x8 grayscale digits with 16 grey levels, like the scanned handwritten
digits of issue 10 (which are not available offline here). Each image renders one digit 0-9 in a random DejaVu
font, size, rotation, stroke and position at 32x32, then box-filters it down to 8x8 and quantises to 16 levels.
The script's loader upscales the 8x8 PNGs to --image-size.

    python runs/01_conv_vs_attention/make_digits_like.py /tmp/digits_like --train 300 --test 100
    python 01_conv_vs_attention.py --quick --data /tmp/digits_like ...
"""
import argparse
import glob
import os
import random

from PIL import Image, ImageDraw, ImageFont


def render(digit, font_path, rng):
    size = rng.randint(28, 36)
    font = ImageFont.truetype(font_path, size)
    img = Image.new("L", (32, 32), 0)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), str(digit), font=font, stroke_width=rng.randint(0, 1))
    w, h = box[2] - box[0], box[3] - box[1]
    x = (32 - w) // 2 - box[0] + rng.randint(-2, 2)
    y = (32 - h) // 2 - box[1] + rng.randint(-2, 2)
    draw.text((x, y), str(digit), fill=255, font=font, stroke_width=rng.randint(0, 1), stroke_fill=255)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    img = img.resize((8, 8), Image.BOX)                      # 4x4 box filter: like the 8x8 scans' pixel averaging
    return img.point(lambda v: (v // 16) * 17)               # 16 grey levels, as in the scanned digits


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=300, help="images per class in train/")
    p.add_argument("--test", type=int, default=100, help="images per class in test/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))
    assert fonts, "needs the DejaVu fonts (apt-get install fonts-dejavu-core)"
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("test", args.test)):
        for digit in range(10):
            d = os.path.join(args.out, split, str(digit))
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                render(digit, rng.choice(fonts), rng).save(os.path.join(d, f"{i:04d}.png"))
    print(f"wrote {10 * (args.train + args.test)} images to {args.out} ({len(fonts)} fonts)")


if __name__ == "__main__":
    main()
