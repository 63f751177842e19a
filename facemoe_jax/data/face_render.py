"""Drawing a synthetic face: implicit shapes on the pixel grid with one-pixel soft edges.

The image spans [-1, 1] on both axes (x right, y down), like an aligned face crop; traits are in
face units, mapped to the image by the per-image similarity transform (`_Pose`). Textures finer
than ~2.5 pixels fade out instead of aliasing.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from facemoe_jax.data.face_traits import (
    _HAIRLINE_STYLES,
    draw_nuisance,
)


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> np.ndarray:
    """Pixel-centre coordinates along one axis, in [-1, 1], (image_size,) float32."""
    return (np.arange(image_size, dtype=np.float32) + 0.5) * (2.0 / image_size) - 1.0


@functools.lru_cache(maxsize=8)
def _noise_bank(image_size: int) -> np.ndarray:
    """A fixed field of unit Gaussian noise, (3, B, B) float32 with B = max(256, 2 * size).

    Drawing fresh Gaussian noise costs more than rendering the face on this class of CPU, so
    each image crops the bank at a random offset instead: the noise is still a deterministic
    function of the image's generator, and it carries no identity information.
    """
    side = max(256, 2 * image_size)
    return np.random.default_rng(0x5EED).standard_normal((3, side, side), dtype=np.float32)


class _Pose:
    """The similarity transform between face units and image coordinates, on a pixel grid.

    ``X``, ``Y`` (S, S) are the face coordinates of every pixel centre. Because the transform is
    affine, any linear function of face coordinates is a sum of a row vector and a column vector
    on the grid (``linear_field``), which is what makes gradients and stripes cheap.
    """

    def __init__(self, image_size: int, angle: float, scale: float, shift_x: float, shift_y: float):
        self.size = image_size
        self.scale = scale
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.shift_x, self.shift_y = shift_x, shift_y
        centres = _pixel_centres(image_size)
        self.dx = centres - shift_x  # (S,) image x relative to the face centre
        self.dy = centres - shift_y
        self.pixel = 2.0 / (image_size * scale)  # one pixel, in face units
        self.X = self.linear_field(1.0, 0.0)
        self.Y = self.linear_field(0.0, 1.0)

    def linear_field(self, a: float, b: float, c: float = 0.0) -> np.ndarray:
        """a * X + b * Y + c on the grid, (S, S) float32, in two vector ops."""
        inv = 1.0 / self.scale
        along_x = (a * self.cos - b * self.sin) * inv  # d(field) / d(image x)
        along_y = (a * self.sin + b * self.cos) * inv
        return (along_x * self.dx)[None, :] + (along_y * self.dy + c)[:, None]

    def to_image(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates of face points (x, y)."""
        image_x = self.shift_x + self.scale * (self.cos * x - self.sin * y)
        image_y = self.shift_y + self.scale * (self.sin * x + self.cos * y)
        return image_x, image_y

    def rows(self, y_top: float, y_bottom: float, half_width: float = 1.3) -> slice:
        """Image rows that can hold face points with y in [y_top, y_bottom] and |x| <= half_width.

        Features are drawn only on these rows: an eye band is a fifth of the image, so this
        is most of the renderer's speed.
        """
        # Image y of a face point is shift_y + scale * (sin * x + cos * y): extreme at corners.
        reach_x = abs(self.sin) * half_width
        top = self.cos * y_top if self.cos > 0 else self.cos * y_bottom
        bottom = self.cos * y_bottom if self.cos > 0 else self.cos * y_top
        to_row = 0.5 * self.size
        first = int(math.floor((self.shift_y + self.scale * (top - reach_x) + 1.0) * to_row - 0.5))
        last = int(math.ceil((self.shift_y + self.scale * (bottom + reach_x) + 1.0) * to_row - 0.5))
        first, last = first - 1, last + 2
        return slice(min(max(first, 0), self.size), min(max(last, 0), self.size))


def _soft_inside(signed_distance: np.ndarray, pixel: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape from its (approximate) signed distance, 1 px soft edge."""
    return np.clip(0.5 - signed_distance * (1.0 / pixel), 0.0, 1.0)


def _ellipse_distance(x, y, half_width: float, half_height: float):
    """Approximate signed distance to an axis-aligned ellipse centred at the origin.

    Uses (q - 1) / 2 * r with q the normalised radius squared: exact to first order at the
    boundary along the minor axis, cheap (no sqrt), and shapes only need a plausible 1 px edge.
    """
    q = (x * (1.0 / half_width)) ** 2 + (y * (1.0 / half_height)) ** 2
    return (q - 1.0) * (0.5 * min(half_width, half_height))


def _blend(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place: image += alpha * (colour - image); image (3, h, w), alpha (h, w).

    ``colour`` is (3,) or (3, h, w). Channel-first keeps the broadcast over long rows, which is
    twice as fast as broadcasting over a trailing axis of 3.
    """
    if colour.ndim == 1:
        colour = colour[:, None, None]
    difference = colour - image
    difference *= alpha
    image += difference


_SCLERA = np.array([0.93, 0.92, 0.9], np.float32)
_PUPIL = np.array([0.03, 0.03, 0.03], np.float32)
_EYELID = np.array([0.08, 0.05, 0.04], np.float32)
_MOUTH_GAP = np.array([0.12, 0.04, 0.04], np.float32)


def _hairline_y(u: np.ndarray, traits: dict) -> np.ndarray:
    """Hairline height (face units, y down) as a function of u = x / face half-width."""
    style = _HAIRLINE_STYLES[traits["hairline_style"]]
    h0, depth = traits["hairline_height"], traits["hairline_depth"]
    if style == "rounded":
        return h0 + depth * u * u
    if style == "widows_peak":
        return h0 + 0.1 + depth * (0.6 * u * u - 0.5 * np.exp(-((u * 8.0) ** 2)))
    if style == "side_part":
        return h0 + 0.5 * depth * u * u + 0.6 * depth * traits["part_side"] * u
    if style == "fringe":  # bangs low over the forehead, with a jagged edge
        return h0 + 0.22 + 0.03 * np.cos(u * 25.0) + 0.3 * depth * u * u
    if style == "receding":  # M shape: temples recede
        return h0 - 1.2 * depth * np.exp(-(((np.abs(u) - 0.55) * 4.0) ** 2)) + 0.3 * depth * u * u
    return np.full_like(u, -2.0)  # shaved: no hair over the face


def _paint_background(image: np.ndarray, pose: _Pose, n: dict) -> None:
    """Colour + linear gradient + two soft elliptical blobs (clutter), in image coordinates."""
    centres = _pixel_centres(pose.size)
    angle, strength = n["background_gradient_angle"], n["background_gradient"]
    gradient = (strength * math.cos(angle) * centres)[None, :] + (
        strength * math.sin(angle) * centres
    )[:, None]
    image[:] = gradient
    image += np.array([n["background_r"], n["background_g"], n["background_b"]], np.float32)[
        :, None, None
    ]
    for b in range(2):
        radius = n[f"blob{b}_radius"]
        radius_y = radius * n[f"blob{b}_aspect"]
        q = ((centres - n[f"blob{b}_x"]) * (1.0 / radius))[None, :] ** 2 + (
            (centres - n[f"blob{b}_y"]) * (1.0 / radius_y)
        )[:, None] ** 2
        edge = 0.5 * min(radius, radius_y) * pose.size / 4.0  # 4 px soft edge: out of focus
        alpha = np.clip(0.5 - (q - 1.0) * edge, 0.0, n[f"blob{b}_opacity"])
        colour = np.array([n[f"blob{b}_r"], n[f"blob{b}_g"], n[f"blob{b}_b"]], np.float32)
        _blend(image, alpha, colour)


def render_face(traits: dict, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Renders one image of the identity described by ``traits``.

    Per-image nuisance drawn from ``rng`` (``draw_nuisance``): in-plane rotation (+-10 deg),
    shift (+-6 % of the side), scale (+-8 %), slight yaw (features slide sideways by their
    depth, the head narrows), expression (mouth curvature and opening, eye openness and blinks,
    brow raise, gaze), lighting (directional gradient, brightness, contrast, colour cast),
    background (colour, gradient, two soft blobs of clutter) and Gaussian noise.

    Layers are painted back to front on a channel-first float image: background, neck and
    ears, skin (shading, blush, texture, moles), beard, eyes, brows, nose, mouth, moustache,
    hair; then lighting and noise. Small features are evaluated only on the rows they can
    touch (``_Pose.rows``).

    Args:
      traits: output of ``identity_traits``.
      rng: source of the per-image nuisance.
      image_size: side S in pixels (looks sensible from 32 to 120).

    Returns:
      uint8 array (S, S, 3), RGB.
    """
    t = traits
    S = int(image_size)
    n = draw_nuisance(rng)
    pose = _Pose(S, n["angle"], n["scale"], n["shift_x"], n["shift_y"])
    X, Y, pixel, yaw = pose.X, pose.Y, pose.pixel, n["yaw"]
    image = np.empty((3, S, S), np.float32)
    _paint_background(image, pose, n)

    # --- Head outline: an ellipse whose lower half narrows towards the chin by jaw_taper.
    a = t["face_half_width"] * (1.0 - 0.08 * abs(yaw))
    b = t["face_half_height"]
    cy_face = t["face_center_y"]
    head_shift = 0.04 * yaw
    Xh = X + head_shift
    Yh = Y - cy_face
    below_centre = np.clip(Yh * (1.0 / b), 0.0, 1.0)
    width_scale = 1.0 - t["jaw_taper"] * below_centre * below_centre
    q_face = (Xh * (1.0 / a) / width_scale) ** 2 + (Yh * (1.0 / b)) ** 2
    face = _soft_inside((q_face - 1.0) * (0.5 * min(a, b)), pixel)
    skin = t["skin"]

    # --- Neck below the chin and ears beside the face, painted before (under) the face.
    rows = pose.rows(cy_face + 0.3, 3.0)
    neck_d = np.maximum(np.abs(Xh[rows]) - 0.42 * a, cy_face + 0.3 - Y[rows])
    _blend(image[:, rows], _soft_inside(neck_d, pixel), skin * 0.72)
    ear_y = t["eye_y"] + 0.08
    rows = pose.rows(ear_y - t["ear_size"], ear_y + t["ear_size"], half_width=2.0)
    ear_d = _ellipse_distance(
        np.abs(Xh[rows]) - a * 0.97, Y[rows] - ear_y, t["ear_size"] * 0.5, t["ear_size"]
    )
    _blend(image[:, rows], _soft_inside(ear_d, pixel), skin * 0.85)

    # --- Skin: rounded shading, identity texture, moles, cheek blush.
    shade = np.minimum(q_face, 1.0)
    brightness = 1.0 - 0.28 * shade * shade
    # Texture: two crossed sinusoids of identity-specific period and orientation, faded out
    # as they approach the pixel grid's Nyquist limit instead of aliasing.
    period = t["texture_period"]
    gain = np.clip((0.4 - pixel / period) / 0.15, 0.0, 1.0) * t["texture_amplitude"]
    if gain > 0:
        k1 = 2 * math.pi / period
        k2 = k1 / 1.3
        angle1, angle2 = t["texture_angle"], t["texture_angle"] + 1.2
        yaw_offset = -yaw * 0.06  # skin moves with the features' midline
        stripes1 = pose.linear_field(
            k1 * math.cos(angle1),
            k1 * math.sin(angle1),
            float(t["texture_phase"][0]) + k1 * math.cos(angle1) * yaw_offset,
        )
        stripes2 = pose.linear_field(
            k2 * math.cos(angle2),
            k2 * math.sin(angle2),
            float(t["texture_phase"][1]) + k2 * math.cos(angle2) * yaw_offset,
        )
        texture = np.sin(stripes1)
        texture *= np.sin(stripes2)
        texture *= gain
        brightness += texture
    # Moles: isotropic Gaussians are rotation invariant, so each is separable in image
    # coordinates; mass-preserving so that sub-pixel moles fade rather than flicker.
    centres = _pixel_centres(S)
    mole_x, mole_y = pose.to_image(t["mole_xy"][:, 0] + yaw * 0.06, t["mole_xy"][:, 1])
    sigma2 = (t["mole_radius"] ** 2 * 0.5 + (0.5 * pixel) ** 2) * pose.scale**2
    weight = t["mole_darkness"] * np.minimum(
        1.0, t["mole_radius"] ** 2 * 0.5 * pose.scale**2 / sigma2
    )
    inv_two_sigma2 = (0.5 / sigma2)[:, None]
    along_x = np.exp(-((centres[None, :] - mole_x[:, None]) ** 2) * inv_two_sigma2)  # (N, S)
    along_y = np.exp(-((centres[None, :] - mole_y[:, None]) ** 2) * inv_two_sigma2)
    moles = (along_y * weight[:, None]).T @ along_x  # (S, S)
    brightness *= 1.0 - np.minimum(moles, 0.85)
    skin_field = skin[:, None, None] * brightness
    rows = pose.rows(-0.1, 0.5)
    Xm = X[rows] - yaw * 0.06
    cheek = np.exp(-((np.abs(Xm) - 0.42) ** 2 + (Y[rows] - 0.2) ** 2) * 18.0)
    skin_field[1:, rows] -= t["blush"] * cheek
    _blend(image, face, skin_field)

    # --- Beard over the lower face (under the mouth and the moustache).
    if t["beard"] > 0:
        rows = pose.rows(t["mouth_y"] - 0.15, 3.0)
        Yr = Y[rows] - t["mouth_y"]
        beard = face[rows] * np.clip((Yr + 0.12) * 8.0, 0.0, 1.0)
        beard *= np.clip((np.abs(Xh[rows]) - 0.25 * a) * 6.0 + Yr * 5.0, 0.0, 1.0)
        _blend(image[:, rows], beard * t["beard"], t["hair"] * 0.9)

    # --- Eyes and brows, mirror-symmetric about the yawed midline (one band of rows).
    ew = t["eye_half_width"]
    eye_h = ew * t["eye_aspect"]
    brow_y = t["eye_y"] - eye_h - t["brow_gap"] - n["brow_raise"]
    frame_w = max(1.5 * ew, 0.14)  # glasses: lens half-width and half-height
    frame_h = 0.72 * frame_w
    rows = pose.rows(brow_y - 0.12, t["eye_y"] + max(eye_h, frame_h) + 0.05)
    img = image[:, rows]
    Xe = np.abs(X[rows] - yaw * 0.06) - t["eye_half_spacing"]
    Ye = Y[rows] - t["eye_y"]
    cos_t, sin_t = math.cos(t["eye_tilt"]), math.sin(t["eye_tilt"])
    Xr = cos_t * Xe - sin_t * Ye
    Yr = sin_t * Xe + cos_t * Ye
    openness = n["eye_openness"] if n["blink"] > 0.04 else 0.12
    eh = eye_h * openness
    eye_d = _ellipse_distance(Xr, Yr, ew, eh)
    if t["eye_shadow"] > 0:  # a coloured lid above the eye (identity, not expression)
        shadow_d = _ellipse_distance(Xr, Yr + 0.7 * eye_h, 1.15 * ew, 1.2 * eye_h)
        _blend(img, _soft_inside(shadow_d, pixel) * t["eye_shadow"], t["eye_shadow_colour"])
    sclera = _soft_inside(eye_d, pixel)
    _blend(img, sclera, _SCLERA)
    iris_r = t["iris_fraction"] * ew
    Xi = np.abs(X[rows] - yaw * 0.07) - t["eye_half_spacing"]
    Xi -= n["gaze"] * ew * np.sign(X[rows])
    iris_d = np.sqrt(Xi * Xi + Ye * Ye) - iris_r
    iris = _soft_inside(iris_d, pixel) * sclera
    _blend(img, iris, t["iris"])
    pupil = _soft_inside(iris_d + 0.55 * iris_r, pixel) * sclera
    _blend(img, pupil, _PUPIL)
    lid = _soft_inside(np.abs(eye_d - 0.4 * pixel) - 0.5 * pixel - 0.01, pixel)
    lid *= np.clip(Yr * (-4.0 / max(eh, 1e-3)), 0.0, 1.0)  # upper half only
    lid *= _soft_inside(np.abs(Xr) - 1.05 * ew, pixel)  # no further than the eye corners
    _blend(img, lid * t["eyelid_darkness"], _EYELID)
    # Brows: bars bent by angle and arch above each eye.
    Yb = Y[rows] - brow_y
    Yb += math.tan(t["brow_angle"]) * Xe + t["brow_arch"] * Xe * Xe
    brow_len = t["brow_half_length"]
    brow_d = np.maximum(np.abs(Xe) - brow_len, np.abs(Yb) - t["brow_thickness"])
    brow = _soft_inside(brow_d, pixel)
    brow *= np.clip(1.0 - np.abs(Xe) * (1.0 / (1.3 * brow_len)), 0.3, 0.9)  # thinning ends
    _blend(img, brow, t["brow_colour"])
    # Glasses: a frame around each eye (round or rectangular) and a bridge between them.
    half_thickness = 0.5 * t["glasses_thickness"]
    if half_thickness > 0:
        if t["glasses_round"]:
            lens_d = _ellipse_distance(Xe, Ye, frame_w, frame_h)
        else:
            lens_d = np.maximum(np.abs(Xe) - frame_w, np.abs(Ye) - frame_h)
        frame = _soft_inside(np.abs(lens_d) - half_thickness, pixel)
        bridge_d = np.maximum(
            np.abs(Ye + 0.3 * frame_h) - half_thickness,
            Xe + 0.98 * frame_w,  # between the lenses: |x| < spacing - frame_w
        )
        frame = np.maximum(frame, _soft_inside(bridge_d, pixel))
        _blend(img, frame, t["glasses_colour"])

    # --- Nose: a shaded bridge beside the midline and two nostrils.
    nose_tip = t["eye_y"] + t["nose_length"]
    nw = t["nose_half_width"]
    rows = pose.rows(t["eye_y"], nose_tip + 0.1 * nw + 0.05)
    Xn = X[rows] - yaw * 0.12
    Yn = Y[rows]
    along = np.clip((Yn - t["eye_y"]) * (1.0 / t["nose_length"]), 0.0, 1.0)
    bridge = np.exp(-(((Xn - 0.45 * nw * along) * (1.0 / (0.25 * nw))) ** 2)) * along
    bridge *= Yn < nose_tip
    image[:, rows] *= 1.0 - t["nose_darkness"] * bridge
    nostril_d = _ellipse_distance(np.abs(Xn) - 0.55 * nw, Yn - nose_tip, 0.32 * nw, 0.16 * nw)
    _blend(image[:, rows], _soft_inside(nostril_d, pixel) * 0.7, skin * 0.35)

    # --- Mouth: upper and lower lips bent by the smile, a dark gap when open; moustache.
    mw = t["mouth_half_width"]
    curve = t["mouth_curve"] + n["smile"]
    opening = n["mouth_opening"] if n["mouth_open_chance"] < 0.35 else 0.0
    lip = t["lip_thickness"]
    mouth_top = t["mouth_y"] - 0.5 * opening - 2 * lip - 0.07 - max(curve, 0.0) * 0.5 * mw * mw
    mouth_bottom = t["mouth_y"] + 0.5 * opening + 2 * lip + max(-curve, 0.0) * 0.5 * mw * mw
    rows = pose.rows(mouth_top - 0.02, mouth_bottom + 0.02)
    img = image[:, rows]
    Xo = X[rows] - yaw * 0.08
    bend = (0.5 * curve) * Xo * Xo
    Ym = Y[rows] - t["mouth_y"] + bend
    in_width = np.abs(Xo) * (1.0 / mw)
    beyond = in_width - 1.0
    lip_th = lip * np.clip(1.0 - in_width * in_width, 0.0, 1.0)
    upper_d = np.maximum(np.abs(Ym + 0.5 * opening + 0.5 * lip_th) - 0.5 * lip_th, beyond)
    lower_d = np.maximum(np.abs(Ym - 0.5 * opening - 0.6 * lip_th) - 0.6 * lip_th, beyond)
    _blend(img, _soft_inside(np.minimum(upper_d, lower_d) - 0.15 * pixel, pixel), t["lips"])
    gap_d = np.maximum(np.abs(Ym) - 0.5 * opening - 0.3 * pixel, in_width - 0.92)
    _blend(img, _soft_inside(gap_d, pixel) * 0.85, _MOUTH_GAP)
    if t["moustache"] > 0:
        Ymu = Ym - 0.4 * bend + 0.5 * opening + 1.3 * lip + 0.03
        moustache_d = np.maximum(np.abs(Ymu) - 0.03, np.abs(Xo) - 0.95 * mw)
        _blend(img, _soft_inside(moustache_d, pixel) * t["moustache"], t["hair"] * 0.85)

    # --- Hair: everywhere inside the hair outline except on the face below the hairline.
    vol = t["hair_volume"]
    shaved = _HAIRLINE_STYLES[t["hairline_style"]] == "shaved"
    if shaved:  # stubble on the scalp only
        hair_alpha = face * 0.35
        hairline = np.clip((Y - t["hairline_height"]) * (1.0 / pixel) + 0.5, 0.0, 1.0)
        hair_alpha *= 1.0 - hairline
    else:
        outer_d = _ellipse_distance(Xh, Yh + 0.5 * vol, a + vol, b + vol * 0.8)
        hair_alpha = _soft_inside(outer_d, pixel)
        hair_alpha *= _soft_inside(Y - t["hair_bottom"], 2 * pixel)
        # On the face, hair only above the hairline (which never reaches below y = 0).
        on_face_below_line = face.copy()
        rows = pose.rows(-3.0, 0.0)
        above_line = _soft_inside(Y[rows] - _hairline_y(Xh[rows] * (1.0 / a), t), pixel)
        on_face_below_line[rows] *= 1.0 - above_line
        hair_alpha *= 1.0 - on_face_below_line
    strands = np.sin(pose.linear_field(40.0, 6.0))
    strands *= 0.12
    strands += 1.0
    _blend(image, hair_alpha, t["hair"][:, None, None] * strands)

    # --- Earrings: small coloured studs at the ear lobes, in front of the hair.
    radius = t["earring_radius"]
    if radius > 0:
        lobe_y = ear_y + 0.85 * t["ear_size"]
        rows = pose.rows(lobe_y - radius, lobe_y + radius, half_width=2.0)
        stud_x = np.abs(Xh[rows]) - a * 0.97
        stud_d = np.sqrt(stud_x * stud_x + (Y[rows] - lobe_y) ** 2) - radius
        _blend(image[:, rows], _soft_inside(stud_d, pixel), t["earring_colour"])

    # --- Lighting (directional gradient, contrast, brightness, colour cast), noise, to uint8.
    light_x = n["light_strength"] * math.cos(n["light_angle"]) * centres
    light_y = n["light_strength"] * math.sin(n["light_angle"]) * centres
    image *= light_x[None, :] + (1.0 + light_y)[:, None]
    # out = 255 * cast * ((image - 0.5) * contrast + 0.5 * brightness) + 0.5 (rounding)
    cast = np.array([1.0 + n["cast_r"], 1.0, 1.0 + n["cast_b"]], np.float32)
    channel_gain = (255.0 * n["contrast"]) * cast
    channel_offset = 255.0 * cast * (0.5 * n["brightness"] - 0.5 * n["contrast"]) + 0.5
    image *= channel_gain[:, None, None]
    image += channel_offset[:, None, None]
    bank = _noise_bank(S)
    top = int(n["noise_y"] * (bank.shape[1] - S))
    left = int(n["noise_x"] * (bank.shape[2] - S))
    image += bank[:, top : top + S, left : left + S] * (255.0 * n["noise_sigma"])
    np.clip(image, 0.0, 255.0, out=image)
    return image.transpose(1, 2, 0).astype(np.uint8, order="C")
