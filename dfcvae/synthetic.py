"""Synthetic CelebA look-alikes: procedurally drawn faces whose attributes are true by construction.

`draw_face(rng)` -> a 178x218 RGB image placed like CelebA's aligned crops, and its attributes.
Each of SYNTHETIC_ATTRIBUTES is drawn exactly when it is true (glasses, hats, smiles, hair
colours, beards ...), with CelebA-like correlations; CelebA's other columns are -1. The same
`random.Random` seed draws the same face. Demo and test data (the fetch stage's
data.source: synthetic), never a stand-in for CelebA.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dfcvae.shards.format import ATTRIBUTE_NAMES

WIDTH, HEIGHT = 178, 218  # CelebA's aligned images
MARGIN = 40  # faces are drawn on a larger canvas, rotated, then cropped

# CelebA's attributes the renderer does not draw (face shape, lips, hair texture, necklaces): their
# column is -1 for every face, which is no ground truth. Every other one is 1 exactly when drawn.
NOT_DRAWN = frozenset(
    {
        "Attractive",
        "Big_Lips",
        "Double_Chin",
        "High_Cheekbones",
        "Oval_Face",
        "Pointy_Nose",
        "Straight_Hair",
        "Wavy_Hair",
        "Wearing_Necklace",
        "Wearing_Necktie",
    }
)
SYNTHETIC_ATTRIBUTES = tuple(name for name in ATTRIBUTE_NAMES if name not in NOT_DRAWN)
HAIR = {
    "Black_Hair": (25, 20, 18),
    "Brown_Hair": (105, 65, 35),
    "Blond_Hair": (225, 190, 110),
    "Gray_Hair": (170, 170, 172),
    "red": (150, 60, 30),
}
SKIN = [(235, 200, 170), (215, 170, 135), (190, 140, 100), (150, 100, 65), (105, 70, 45)]
PALE = (248, 228, 218)


def sample_attributes(rng: random.Random) -> dict[str, bool]:
    """One face's attributes, with CelebA-like correlations (men bald or bearded, the old grey)."""
    a = {"Male": rng.random() < 0.5, "Young": rng.random() < 0.6}
    a["Wearing_Hat"] = rng.random() < 0.15
    a["Bald"] = a["Male"] and not a["Young"] and not a["Wearing_Hat"] and rng.random() < 0.4
    old_grey = not a["Young"] and rng.random() < 0.5
    colour = "Gray_Hair" if old_grey else rng.choice(["Black_Hair", "Brown_Hair", "Blond_Hair", "red"])
    for name in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair"):
        a[name] = colour == name and not a["Bald"]
    a["_hair"] = colour
    a["Bangs"] = not a["Bald"] and not a["Wearing_Hat"] and rng.random() < 0.3
    hairline_shows = not (a["Bald"] or a["Bangs"] or a["Wearing_Hat"])
    a["Receding_Hairline"] = a["Male"] and hairline_shows and rng.random() < 0.25
    a["Sideburns"] = a["Male"] and not a["Bald"] and rng.random() < 0.3
    a["_long_hair"] = not a["Bald"] and rng.random() < (0.8 if not a["Male"] else 0.1)
    a["Smiling"] = rng.random() < 0.5
    a["Mouth_Slightly_Open"] = rng.random() < (0.6 if a["Smiling"] else 0.25)
    a["Eyeglasses"] = rng.random() < 0.2
    a["Narrow_Eyes"] = rng.random() < 0.15
    a["Pale_Skin"] = rng.random() < 0.15
    a["Chubby"] = rng.random() < 0.15
    a["Big_Nose"] = rng.random() < 0.25
    a["Arched_Eyebrows"] = rng.random() < 0.35
    a["Bushy_Eyebrows"] = rng.random() < 0.2
    a["Bags_Under_Eyes"] = rng.random() < (0.6 if not a["Young"] else 0.1)
    beard = a["Male"] and rng.random() < 0.3
    a["Goatee"] = a["Male"] and not beard and rng.random() < 0.15
    a["Mustache"] = a["Male"] and (beard or rng.random() < 0.15)
    a["5_o_Clock_Shadow"] = a["Male"] and not beard and not a["Goatee"] and rng.random() < 0.25
    a["No_Beard"] = not beard and not a["Goatee"]
    a["_beard"] = beard
    a["Heavy_Makeup"] = not a["Male"] and rng.random() < 0.35
    a["Wearing_Lipstick"] = not a["Male"] and (a["Heavy_Makeup"] or rng.random() < 0.3)
    a["Rosy_Cheeks"] = rng.random() < 0.15
    a["Wearing_Earrings"] = not a["Male"] and rng.random() < 0.35
    a["Blurry"] = rng.random() < 0.05
    return a


def draw_face(rng: random.Random) -> tuple[Image.Image, dict[str, bool]]:
    """A 178x218 face placed like CelebA's aligned crops, and its attributes."""
    a = sample_attributes(rng)
    canvas = _background(rng)  # with a margin, so rotating leaves no empty corners
    draw = ImageDraw.Draw(canvas, "RGBA")  # translucent fills blend
    cx, cy = MARGIN + 89 + rng.gauss(0, 4), MARGIN + 122 + rng.gauss(0, 4)  # face centre: pose varies a little
    half_w = rng.uniform(34, 40) + (7 if a["Chubby"] else 0)
    half_h = rng.uniform(46, 52)
    yaw = rng.uniform(-1, 1)  # turning the head moves the features sideways
    skin = PALE if a["Pale_Skin"] else _jitter(rng, rng.choice(SKIN), 12)
    hair = _jitter(rng, HAIR[a["_hair"]], 15)
    face = (cx, cy, half_w, half_h, yaw)
    _draw_body(draw, rng, face, skin, hair, a)
    _draw_hair(draw, rng, face, hair, a)
    _draw_eyes(draw, rng, face, hair, a)
    _draw_mouth(draw, rng, face, skin, hair, a)
    if a["Wearing_Hat"]:
        _draw_hat(draw, rng, face, hair)
    image = _light(rng, _roll(canvas, rng.uniform(-12, 12), cx, cy))
    return image.filter(ImageFilter.GaussianBlur(2.5) if a["Blurry"] else ImageFilter.BoxBlur(0.5)), a


def _roll(canvas: Image.Image, degrees: float, cx: float, cy: float) -> Image.Image:
    """The WIDTH x HEIGHT window of the canvas, rotated about (cx, cy); nearest, then blurred."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # output pixel (x, y) samples the canvas at R (x + MARGIN - cx, y + MARGIN - cy) + (cx, cy)
    ox, oy = MARGIN - cx, MARGIN - cy
    data = (c, s, c * ox + s * oy + cx, -s, c, -s * ox + c * oy + cy)
    return canvas.transform((WIDTH, HEIGHT), Image.Transform.AFFINE, data, Image.Resampling.NEAREST)


def _jitter(rng: random.Random, colour: tuple, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def _background(rng: random.Random) -> Image.Image:
    width, height = WIDTH + 2 * MARGIN, HEIGHT + 2 * MARGIN
    top, bottom = np.array(_random_colour(rng), np.float32), np.array(_random_colour(rng), np.float32)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.randint(1, 4)):  # clutter: lamps, frames, other heads
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 50)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r * rng.uniform(0.5, 2)), fill=_random_colour(rng) + (rng.randint(60, 200),))
    return image


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def _draw_body(draw, rng, face, skin, hair, a) -> None:
    cx, cy, w, h, _ = face
    if a["_long_hair"]:  # behind everything: shows beside the face and neck
        draw.ellipse((cx - w - 12, cy - h - 10, cx + w + 12, cy + h + 45), fill=hair + (255,))
    draw.ellipse((cx - 85, cy + h + 12, cx + 85, cy + h + 120), fill=_random_colour(rng) + (255,))  # shoulders
    draw.rectangle((cx - 15, cy + h - 15, cx + 15, cy + h + 22), fill=_shade(skin, 0.85))  # neck
    for side in (-1, 1):  # ears, then earrings under them
        draw.ellipse((cx + side * w - 7, cy - 12, cx + side * w + 7, cy + 10), fill=_shade(skin, 0.95))
        if a["Wearing_Earrings"]:
            x = cx + side * w
            draw.ellipse((x - 3, cy + 10, x + 3, cy + 17), fill=(230, 190, 60, 255), outline=(120, 90, 20, 255))
    draw.ellipse((cx - w, cy - h, cx + w, cy + h), fill=skin + (255,))  # face
    if a["Rosy_Cheeks"]:
        for side in (-1, 1):
            x = cx + side * w * 0.55
            draw.ellipse((x - 9, cy + 2, x + 9, cy + 14), fill=(230, 90, 100, 110))


def _shade(colour: tuple, factor: float) -> tuple[int, int, int, int]:
    return tuple(int(min(255, c * factor)) for c in colour[:3]) + (255,)


def _draw_hair(draw, rng, face, hair, a) -> None:
    cx, cy, w, h, _ = face
    if a["Bald"]:
        shine = (255, 255, 255, 90)
        draw.arc((cx - w + 6, cy - h + 4, cx + w - 6, cy - h + 30), 200, 340, fill=shine, width=3)
        return
    hairline = cy - h * (0.78 if a["Receding_Hairline"] else 0.58)
    top = cy - h - 14
    draw.chord((cx - w - 6, top, cx + w + 6, 2 * hairline - top), 180, 360, fill=hair + (255,))
    if a["Sideburns"]:
        for side in (-1, 1):
            x = cx + side * (w - 4)
            draw.rectangle((x - 4, hairline, x + 4, cy + 8), fill=hair + (255,))
    if a["Bangs"]:
        fringe = cy - h * 0.28  # down to just above the eyebrows
        points = [(cx - w - 2, hairline - 4)]
        for k in range(7):  # a jagged edge of locks
            x = cx - w + (k + 0.5) * (2 * w / 7)
            points.append((x, fringe + rng.uniform(-4, 4) + (6 if k % 2 else 0)))
        points.append((cx + w + 2, hairline - 4))
        draw.polygon(points, fill=hair + (255,))


def _draw_eyes(draw, rng, face, hair, a) -> None:
    cx, cy, w, h, yaw = face
    eye_y, shift = cy - 8, yaw * 6
    iris = rng.choice([(70, 45, 25), (60, 110, 160), (70, 120, 70), (40, 30, 25)])
    brow = _shade(hair, 0.6) if a["_hair"] in ("Blond_Hair", "Gray_Hair") else hair + (255,)
    if a["Bald"]:
        brow = (60, 45, 35, 255)
    for side in (-1, 1):
        x = cx + shift + side * w * 0.42
        half_h = 2.2 if a["Narrow_Eyes"] else 4.5
        if a["Heavy_Makeup"]:
            draw.ellipse((x - 10, eye_y - 8, x + 10, eye_y + 2), fill=(120, 60, 140, 150))
        draw.ellipse((x - 8, eye_y - half_h, x + 8, eye_y + half_h), fill=(245, 245, 240, 255))
        r = 3.5 if not a["Narrow_Eyes"] else 2.4
        draw.ellipse((x - r, eye_y - r, x + r, eye_y + r), fill=iris + (255,))
        draw.ellipse((x - 1.3, eye_y - 1.3, x + 1.3, eye_y + 1.3), fill=(10, 10, 10, 255))
        width = 4 if a["Bushy_Eyebrows"] else 2
        if a["Arched_Eyebrows"]:
            draw.arc((x - 11, eye_y - 16, x + 11, eye_y - 2), 200, 340, fill=brow, width=width)
        else:
            draw.line((x - 10, eye_y - 10, x + 10, eye_y - 11), fill=brow, width=width)
        if a["Bags_Under_Eyes"]:
            draw.arc((x - 8, eye_y - 2, x + 8, eye_y + 9), 20, 160, fill=(110, 80, 80, 140), width=2)
        if not a["Young"]:  # crow's feet
            x_out = x + side * 10
            draw.line((x_out, eye_y, x_out + side * 5, eye_y - 3), fill=(90, 60, 50, 150), width=1)
            draw.line((x_out, eye_y + 2, x_out + side * 5, eye_y + 4), fill=(90, 60, 50, 150), width=1)
    if a["Eyeglasses"]:
        _draw_glasses(draw, rng, cx + shift, eye_y, w)
    nose_x = cx + shift * 1.5
    nose_w = 8 if a["Big_Nose"] else 4.5
    draw.polygon([(nose_x, eye_y + 6), (nose_x - nose_w, cy + 14), (nose_x + nose_w, cy + 14)], fill=(0, 0, 0, 40))
    draw.line((nose_x - nose_w, cy + 14, nose_x + nose_w, cy + 14), fill=(60, 30, 20, 120), width=2)


def _draw_glasses(draw, rng, x0, eye_y, w) -> None:
    frame = rng.choice([(20, 20, 20), (120, 80, 30), (180, 180, 190), (150, 20, 30)]) + (255,)
    tint = (30, 30, 40, 170) if rng.random() < 0.25 else None  # sunglasses, eyes still faintly visible
    for side in (-1, 1):
        x = x0 + side * w * 0.42
        draw.rounded_rectangle((x - 12, eye_y - 8, x + 12, eye_y + 8), radius=4, fill=tint, outline=frame, width=2)
        draw.line((x + side * 12, eye_y - 3, x + side * (w * 0.58 + 4), eye_y - 5), fill=frame, width=2)
    draw.line((x0 - w * 0.42 + 12, eye_y - 3, x0 + w * 0.42 - 12, eye_y - 3), fill=frame, width=2)


def _draw_mouth(draw, rng, face, skin, hair, a) -> None:
    cx, cy, w, h, yaw = face
    mx, my = cx + yaw * 5, cy + h * 0.5
    if a["_beard"]:
        draw.chord((cx - w, cy - h * 0.6, cx + w, cy + h + 4), 15, 165, fill=hair + (255,))
    if a["Goatee"]:
        draw.ellipse((mx - 9, my + 8, mx + 9, cy + h + 3), fill=hair + (255,))
    if a["5_o_Clock_Shadow"]:
        draw.chord((cx - w, cy - h * 0.4, cx + w, cy + h), 20, 160, fill=(40, 35, 30, 70))
    lips = (200, 20, 45, 255) if a["Wearing_Lipstick"] else _shade(skin, 0.7)
    if a["Smiling"] and a["Mouth_Slightly_Open"]:
        draw.chord((mx - 14, my - 9, mx + 14, my + 11), 0, 180, fill=(90, 20, 25, 255), outline=lips, width=2)
        draw.rectangle((mx - 9, my + 1, mx + 9, my + 4), fill=(250, 250, 245, 255))  # teeth
    elif a["Smiling"]:
        draw.arc((mx - 14, my - 10, mx + 14, my + 7), 15, 165, fill=lips, width=3)
    elif a["Mouth_Slightly_Open"]:
        draw.ellipse((mx - 8, my - 4, mx + 8, my + 5), fill=(90, 20, 25, 255), outline=lips, width=2)
    else:
        draw.line((mx - 11, my, mx + 11, my), fill=lips, width=3)
    if a["Mustache"]:
        draw.polygon([(mx - 15, my - 3), (mx, my - 9), (mx + 15, my - 3), (mx, my - 5)], fill=hair + (255,))


def _draw_hat(draw, rng, face, hair) -> None:
    cx, cy, w, h, _ = face
    colour = _random_colour(rng) + (255,)
    brim_y = cy - h * 0.55
    for side in (-1, 1):  # hair showing under the brim keeps the hair colour visible
        x = cx + side * (w - 4)
        draw.rectangle((x - 5, brim_y, x + 5, cy - 6), fill=hair + (255,))
    draw.rounded_rectangle((cx - w - 2, cy - h - 30, cx + w + 2, brim_y), radius=12, fill=colour)
    draw.ellipse((cx - w - 20, brim_y - 6, cx + w + 20, brim_y + 6), fill=_shade(colour, 0.75))
    draw.rectangle((cx - w - 2, brim_y - 14, cx + w + 2, brim_y - 8), fill=_shade(colour, 0.5))  # band


def _light(rng: random.Random, image: Image.Image) -> Image.Image:
    """Directional light, exposure and colour cast."""
    side = rng.uniform(-0.35, 0.35) * np.linspace(-1, 1, WIDTH, dtype=np.float32)[:, None]
    cast = np.array([rng.uniform(0.9, 1.1) for _ in range(3)], np.float32)
    gain = ((rng.uniform(0.8, 1.15) + side) * cast * 256).astype(np.uint32)  # (W, 3), fixed point
    pixels = (np.asarray(image).astype(np.uint32) * gain) >> 8
    return Image.fromarray(np.minimum(pixels, 255).astype(np.uint8), "RGB")


def attribute_row(a: dict[str, bool]) -> list[int]:
    """The 40 CelebA columns (ATTRIBUTE_NAMES) as 1/-1: -1 for those not drawn."""
    return [(1 if a[name] else -1) if name in SYNTHETIC_ATTRIBUTES else -1 for name in ATTRIBUTE_NAMES]
