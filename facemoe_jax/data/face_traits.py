"""Identity traits and per-image nuisance of the synthetic faces (what varies, and how much).

An identity is a draw from `identity_traits(identity, seed)`; an image of it adds a draw of
`draw_nuisance(rng)`. `face_render.render_face` turns both into pixels. The docstring of
`synthetic.py` explains why the traits are chosen as they are.
"""

from __future__ import annotations

import math

import numpy as np

# Skin albedos from dark to light; a tone is a position on this ramp (linear between entries).
_SKIN_RAMP = np.array(
    [
        [0.30, 0.19, 0.13],
        [0.48, 0.31, 0.21],
        [0.66, 0.46, 0.33],
        [0.82, 0.62, 0.49],
        [0.93, 0.76, 0.65],
        [0.97, 0.86, 0.78],
    ],
    np.float32,
)
_SKIN_TONES = (0.5, 1.9, 3.2, 4.5)  # the four tones people are drawn from
_HAIR_PALETTE = np.array(
    [
        [0.06, 0.05, 0.05],  # black
        [0.22, 0.14, 0.08],  # dark brown
        [0.42, 0.27, 0.14],  # brown
        [0.85, 0.68, 0.38],  # blond
        [0.66, 0.28, 0.11],  # auburn / red
        [0.66, 0.64, 0.62],  # grey
        [0.92, 0.91, 0.87],  # white
    ],
    np.float32,
)
_HAIR_PROBABILITIES = np.array([0.34, 0.3, 0.12, 0.1, 0.05, 0.05, 0.04])
_IRIS_PALETTE = np.array(
    [
        [0.20, 0.10, 0.05],  # dark brown
        [0.42, 0.24, 0.10],  # brown
        [0.62, 0.38, 0.08],  # amber
        [0.45, 0.45, 0.15],  # hazel
        [0.15, 0.55, 0.25],  # green
        [0.15, 0.35, 0.80],  # blue
        [0.45, 0.70, 0.90],  # light blue
        [0.55, 0.60, 0.66],  # grey
    ],
    np.float32,
)
# Canonical mole sites (x, y) in face units, mirrored pairs: forehead, cheekbone, cheek, chin,
# upper lip, beside the nose.
_MOLE_SITES = np.array(
    [
        [sx * x, y]
        for x, y in (
            (0.25, -0.45),
            (0.45, 0.05),
            (0.35, 0.3),
            (0.15, 0.8),
            (0.2, 0.38),
            (0.12, 0.1),
        )
        for sx in (-1.0, 1.0)
    ],
    np.float32,
)
_LIP_PALETTE = np.array(
    [[0.85, 0.45, 0.50], [0.75, 0.20, 0.25], [0.50, 0.22, 0.20], [0.90, 0.60, 0.55]], np.float32
)
# Small coloured accents: eye shadow and earrings (present for some identities only).
_EYE_SHADOW_PALETTE = np.array(
    [[0.35, 0.45, 0.85], [0.55, 0.30, 0.65], [0.62, 0.42, 0.38], [0.30, 0.60, 0.35]], np.float32
)
_EARRING_PALETTE = np.array(
    [[0.95, 0.80, 0.25], [0.85, 0.85, 0.90], [0.85, 0.10, 0.15], [0.10, 0.35, 0.90]], np.float32
)
_GLASSES_PALETTE = np.array(
    [[0.05, 0.05, 0.05], [0.45, 0.25, 0.10], [0.75, 0.70, 0.55], [0.60, 0.10, 0.10]], np.float32
)
# Hairline styles, see _hairline_y.
_HAIRLINE_STYLES = ("rounded", "widows_peak", "side_part", "fringe", "receding", "shaved")


def identity_traits(identity: int, seed: int) -> dict:
    """Draws the traits of one identity, deterministically from ``(seed, identity)``.

    Traits come in two groups. *Coarse* traits survive an 8 px image (skin tone, hair colour
    and silhouette, head shape, beard) and are kept low in entropy on purpose: skin tone is one
    of five tones, hair colour one of seven, so at very low resolution many people look alike,
    and the per-image colour cast and brightness blur the rest. *Fine* traits (eye geometry and
    iris colour, eyebrows, glasses, nose, lips, moles, skin texture) are continuous or many
    valued and carry most of the identity; they are 1..4 pixels wide at 32 px.

    Args:
      identity: non-negative identity number (training uses 0..n-1, evaluation starts at
        ``HELD_OUT_FIRST_IDENTITY``).
      seed: dataset seed; a different seed gives a different population.

    Returns:
      A dict of floats, ints and small float32 arrays (colours are RGB in [0, 1]). Lengths are
      in face units (the image spans [-1, 1]).
    """
    if identity < 0 or seed < 0:
        raise ValueError(f"identity and seed must be non-negative, got {identity=} {seed=}")
    rng = np.random.default_rng([seed, identity])
    u = rng.uniform

    # Coarse: skin tone, one of five positions on the ramp, lightly jittered.
    skin_position = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + u(-0.1, 0.1)
    low = min(int(skin_position), len(_SKIN_RAMP) - 2)
    skin = _SKIN_RAMP[low] + (skin_position - low) * (_SKIN_RAMP[low + 1] - _SKIN_RAMP[low])
    skin = np.clip(skin, 0, 1).astype(np.float32)
    hair_index = int(rng.choice(len(_HAIR_PALETTE), p=_HAIR_PROBABILITIES))
    hair = np.clip(_HAIR_PALETTE[hair_index] * u(0.9, 1.1), 0, 1).astype(np.float32)
    male_like = rng.random() < 0.5

    # Fine: colours of small parts.
    iris = _IRIS_PALETTE[rng.integers(len(_IRIS_PALETTE))] + rng.normal(0, 0.05, 3)
    lip_tint = _LIP_PALETTE[rng.integers(len(_LIP_PALETTE))]
    lips = skin + u(0.35, 0.85) * (lip_tint - skin)
    # Moles at canonical sites (each present with probability 0.3, jittered): a per-identity
    # bit pattern that a network can learn site by site, invisible at very low resolution.
    present = rng.random(len(_MOLE_SITES)) < 0.3
    mole_xy = _MOLE_SITES[present] + rng.normal(0.0, 0.02, (int(present.sum()), 2))
    num_moles = len(mole_xy)
    has_glasses = rng.random() < 0.25
    # Brows are not always the hair's colour (dyed or bleached hair, grey hair and dark brows).
    brow_colour = _HAIR_PALETTE[rng.choice(len(_HAIR_PALETTE), p=_HAIR_PROBABILITIES)]
    brow_colour = 0.75 * (0.5 * hair + 0.5 * brow_colour)
    has_eye_shadow = rng.random() < 0.3
    has_earrings = rng.random() < 0.35

    return {
        "identity": int(identity),
        # --- Coarse traits.
        # Head outline: ellipse half-axes; the lower half narrows towards the chin by jaw_taper.
        "face_half_width": u(0.66, 0.76),
        "face_half_height": u(0.98, 1.06),
        "face_center_y": u(0.04, 0.12),
        "jaw_taper": u(0.15, 0.35),
        "skin": skin,
        "hair": hair,
        "hairline_style": int(rng.integers(len(_HAIRLINE_STYLES))),
        "hairline_height": u(-0.78, -0.5),
        "hairline_depth": u(0.08, 0.3),  # how strongly the style bends the line
        "part_side": float(rng.choice([-1.0, 1.0])),
        "hair_volume": u(0.04, 0.12),
        "hair_bottom": u(0.6, 0.9) if rng.random() < 0.4 else u(-0.1, 0.2),  # long / short
        # Facial hair strengths in [0, 1]: 0 for about three quarters of the people.
        "beard": u(0.35, 0.9) if male_like and rng.random() < 0.35 else 0.0,
        "moustache": u(0.5, 0.95) if male_like and rng.random() < 0.5 else 0.0,
        # --- Fine traits.
        "blush": u(0.0, 0.12),
        "ear_size": u(0.10, 0.19),
        "earring_radius": u(0.035, 0.055) if has_earrings else 0.0,
        "earring_colour": _EARRING_PALETTE[rng.integers(len(_EARRING_PALETTE))],
        # Eyes, mirror-symmetric about the face's midline.
        "eye_y": u(-0.24, -0.06),
        "eye_half_spacing": u(0.24, 0.38),
        "eye_half_width": u(0.09, 0.16),
        "eye_aspect": u(0.32, 0.62),
        "eye_tilt": u(-0.25, 0.25),  # radians, positive lifts the outer corner
        "iris": np.clip(iris, 0, 1).astype(np.float32),
        "iris_fraction": u(0.55, 0.85),  # iris radius / eye half-width
        "eyelid_darkness": u(0.3, 0.85),
        "eye_shadow": u(0.35, 0.65) if has_eye_shadow else 0.0,  # opacity, 0: none
        "eye_shadow_colour": _EYE_SHADOW_PALETTE[rng.integers(len(_EYE_SHADOW_PALETTE))],
        # Eyebrows: bars above the eyes, in hair colour (darkened).
        "brow_gap": u(0.07, 0.16),  # between the top of the eye and the brow
        "brow_half_length": u(0.09, 0.17),
        "brow_thickness": u(0.018, 0.06),
        "brow_angle": u(-0.35, 0.35),  # radians, positive raises the outer end
        "brow_arch": u(0.0, 3.0),
        "brow_colour": brow_colour.astype(np.float32),
        # Glasses: frame around each eye (0 thickness: none).
        "glasses_thickness": u(0.02, 0.035) if has_glasses else 0.0,
        "glasses_round": float(rng.random() < 0.5),  # 1: round frames, 0: rectangular
        "glasses_colour": _GLASSES_PALETTE[rng.integers(len(_GLASSES_PALETTE))],
        # Nose.
        "nose_length": u(0.14, 0.36),  # tip below the eye line
        "nose_half_width": u(0.055, 0.13),
        "nose_darkness": u(0.08, 0.22),
        # Mouth.
        "mouth_y": u(0.40, 0.66),
        "mouth_half_width": u(0.13, 0.28),
        "lip_thickness": u(0.025, 0.065),
        "mouth_curve": u(-0.8, 1.4),  # resting smile curvature
        "lips": np.clip(lips, 0, 1).astype(np.float32),
        # Skin marks: moles and a skin pattern, gone at very low resolution.
        "mole_xy": mole_xy.astype(np.float32),
        "mole_radius": u(0.025, 0.05, num_moles).astype(np.float32),
        "mole_darkness": u(0.4, 0.75, num_moles).astype(np.float32),
        "texture_period": u(0.2, 0.4),  # face units per cycle
        "texture_angle": u(0.0, math.pi),
        "texture_amplitude": u(0.04, 0.09),
        "texture_phase": u(0.0, 2 * math.pi, 2),
    }


# Per-image nuisance: name -> (low, high) of a uniform draw. All are drawn in one call, in this
# order, so an image's nuisance depends only on its generator (not on the identity's traits).
_NUISANCE_RANGES = {
    "angle": (-math.radians(10.0), math.radians(10.0)),  # in-plane rotation
    "scale": (0.92, 1.08),
    "shift_x": (-0.12, 0.12),  # +-6 % of the side (the side spans 2 units)
    "shift_y": (-0.12, 0.12),
    "yaw": (-1.0, 1.0),  # features slide sideways by yaw * depth, the head narrows
    "background_r": (0.1, 0.9),
    "background_g": (0.1, 0.9),
    "background_b": (0.1, 0.9),
    "background_gradient_angle": (0.0, 2 * math.pi),
    "background_gradient": (0.0, 0.25),
    **{
        f"blob{n}_{name}": bounds
        for n in range(2)
        for name, bounds in (
            ("x", (-1.0, 1.0)),
            ("y", (-1.0, 1.0)),
            ("radius", (0.2, 0.6)),
            ("aspect", (0.5, 1.5)),
            ("opacity", (0.4, 0.9)),
            ("r", (0.0, 1.0)),
            ("g", (0.0, 1.0)),
            ("b", (0.0, 1.0)),
        )
    },
    "eye_openness": (0.55, 1.15),
    "blink": (0.0, 1.0),  # blink when below 0.04
    "gaze": (-0.25, 0.25),  # iris offset, in eye half-widths
    "brow_raise": (-0.02, 0.035),
    "smile": (-0.8, 1.2),  # added to the identity's resting mouth curvature
    "mouth_open_chance": (0.0, 1.0),  # open when below 0.35
    "mouth_opening": (0.0, 0.06),
    "light_angle": (0.0, 2 * math.pi),
    "light_strength": (0.0, 0.35),
    "contrast": (0.8, 1.15),
    "brightness": (0.8, 1.2),
    "cast_r": (-0.08, 0.08),
    "cast_b": (-0.08, 0.08),
    "noise_sigma": (0.0, 0.025),
    "noise_x": (0.0, 1.0),  # crop position in the noise bank
    "noise_y": (0.0, 1.0),
}
_NUISANCE_LOW = np.array([low for low, _ in _NUISANCE_RANGES.values()])
_NUISANCE_SPAN = np.array([high - low for low, high in _NUISANCE_RANGES.values()])


def draw_nuisance(rng: np.random.Generator) -> dict:
    """Draws one image's nuisance parameters (see ``_NUISANCE_RANGES``) as a dict of floats."""
    values = _NUISANCE_LOW + _NUISANCE_SPAN * rng.random(len(_NUISANCE_LOW))
    return dict(zip(_NUISANCE_RANGES, values.tolist()))
