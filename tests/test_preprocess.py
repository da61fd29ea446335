"""One preprocessing source: training's evaluation path and the handler see identical tensors."""
import io

import pytest
import torch
from PIL import Image

from training.data import load_image_folder
from returns_model.meta import PreprocessSpec
from returns_model.preprocess import PhotoError, bytes_to_uint8, decode_image, normalize
from tests.conftest import encode


def test_png_through_handler_equals_training_tensor(classifier, fmnist_test):
    images, _ = fmnist_test
    spec = classifier.spec
    training_batch = normalize(images[:50].unsqueeze(1), spec)  # how training/evaluation feeds the model
    decoded = classifier.decode([encode(images[i]) for i in range(50)])
    served = normalize(torch.stack(decoded.pixels), spec)
    assert torch.equal(training_batch, served)


def test_jpeg_through_handler_equals_image_folder_path(classifier, fmnist_test, tmp_path):
    images, _ = fmnist_test
    jpegs = [encode(images[i], "JPEG", quality=85) for i in range(6)]
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls).mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (tmp_path / "train" / ("a" if i % 2 else "b") / f"{i}.jpg").write_bytes(data)
        (tmp_path / "test" / ("a" if i % 2 else "b") / f"{i}.jpg").write_bytes(data)
    ds = load_image_folder(tmp_path, classifier.spec, val_size=1, seed=0)
    served = {bytes(t.numpy()) for t in classifier.decode(jpegs).pixels}
    assert {bytes(t.numpy()) for t in ds.test.images} == served


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_every_pillow_mode_becomes_the_model_input(mode):
    spec = PreprocessSpec()
    img = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    t = normalize(bytes_to_uint8(buf.getvalue(), spec), spec)
    assert t.shape == (1, 28, 28) and t.dtype == torch.float32 and torch.isfinite(t).all()


def test_aspect_ratio_is_kept_by_letterboxing():
    spec = PreprocessSpec()
    buf = io.BytesIO()
    Image.new("L", (280, 140), 255).save(buf, "PNG")
    t = bytes_to_uint8(buf.getvalue(), spec)[0]
    assert t[14].min() == 255 and t[0].max() == 0 and t[-1].max() == 0  # white band, black bars


@pytest.mark.parametrize("data,code", [(b"", "empty"), (b"\x00" * 100, "not_an_image"), (b"GIF89a\x01", "not_an_image")])
def test_bad_bytes_get_a_code(data, code):
    with pytest.raises(PhotoError) as err:
        decode_image(data)
    assert err.value.code == code


def test_truncated_png_and_bomb_are_refused(fmnist_png):
    with pytest.raises(PhotoError) as err:
        decode_image(fmnist_png(0)[:-40])
    assert err.value.code == "corrupt"
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")  # 25 MP of zeros compresses to ~25 kB
    with pytest.raises(PhotoError) as err:
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    assert err.value.code == "too_large" and "5000x5000" in err.value.message


def test_16_bit_photos_map_onto_8_bits_by_value():
    """A 16-bit PNG is decoded by scaling 0..65535 onto 0..255 (v / 257), not clipped, not blacked out."""
    import numpy as np

    values = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really a 16-bit file
    got = bytes_to_uint8(buf.getvalue(), PreprocessSpec())[0].numpy().astype(int)
    want = values.astype(float) / 257
    assert np.abs(got - want).max() <= 1.0
    assert got.max() >= 254 and got[0, 0] == 0


def test_a_real_photo_stored_as_16_bit_decodes_to_its_8_bit_pixels(fmnist_test):
    import numpy as np

    images, _ = fmnist_test
    for i in (0, 1, 2):
        pixels = images[i].numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint16) * 257).save(buf, "PNG")  # the same photo, 16 bits deep
        got = bytes_to_uint8(buf.getvalue(), PreprocessSpec())[0].numpy()
        assert np.abs(got.astype(int) - pixels.astype(int)).max() <= 1, i


def _photo_jpeg(size: tuple[int, int], mode: str = "RGB") -> bytes:
    """A real colour photo (scikit-learn's sample), resized as a phone would store it."""
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[1]).resize(size).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _full_decode(data: bytes, spec: PreprocessSpec) -> torch.Tensor:
    from returns_model.preprocess import image_to_uint8

    return image_to_uint8(decode_image(data), spec)  # no spec: every pixel decoded, then shrunk


@pytest.mark.parametrize("size", [(4032, 3024), (3024, 4032)])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_a_phone_photo_is_decoded_at_an_eighth_and_matches_the_full_decode(size, mode):
    """A 12-megapixel JPEG is decoded at 1/8 scale (504x378, not 36 MB of pixels) and still becomes
    the model input of a full decode, within one grey level, with the same letterbox."""
    spec = PreprocessSpec()
    data = _photo_jpeg(size, mode)
    assert decode_image(data, spec=spec).size == (size[0] // 8, size[1] // 8)
    full, fast = _full_decode(data, spec), bytes_to_uint8(data, spec)
    assert (full.int() - fast.int()).abs().max() <= 1
    assert torch.equal(full.sum(1) > 0, fast.sum(1) > 0) and torch.equal(full.sum(2) > 0, fast.sum(2) > 0)


def test_the_letterbox_follows_the_full_photo_not_the_rounded_reduced_one():
    """300x241 decodes at 1/2 as 150x121 (sizes round up): a band of round(121 x 28 / 150) = 23 rows
    from the reduced size, 22 from the photo's own 300:241, which a full decode letterboxes to."""
    spec = PreprocessSpec()
    data = _photo_jpeg((300, 241))
    assert decode_image(data, spec=spec).size == (150, 121)
    full, fast = _full_decode(data, spec), bytes_to_uint8(data, spec)
    assert int((full.sum((0, 2)) > 0).sum()) == int((fast.sum((0, 2)) > 0).sum()) == 22


def test_small_jpegs_and_other_formats_decode_exactly_as_before():
    spec = PreprocessSpec()
    small = _photo_jpeg((160, 120))  # under 2 x 3 x 28 on a side: no scaled decoding
    assert decode_image(small, spec=spec).size == (160, 120)
    assert torch.equal(_full_decode(small, spec), bytes_to_uint8(small, spec))
    buf = io.BytesIO()
    Image.new("L", (1200, 900), 180).save(buf, "PNG")
    assert decode_image(buf.getvalue(), spec=spec).size == (1200, 900)


def test_a_reduced_image_cropped_afterwards_letterboxes_by_its_own_size():
    from returns_model.preprocess import image_to_uint8

    spec = PreprocessSpec()
    img = decode_image(_photo_jpeg((4032, 3024)), spec=spec)
    square = img.crop((0, 0, 378, 378))  # Pillow copies img.info: the full size no longer applies
    assert image_to_uint8(square, spec)[0].min() > 0  # fills the frame: no black bars


def _tagged(img: Image.Image, fmt: str, orientation: int | None = None, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        tags = Image.Exif()
        tags[0x0112] = orientation  # EXIF Orientation
        exif = tags.tobytes()
    img.save(buf, fmt, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def test_a_phone_photo_tagged_sideways_is_classified_upright():
    """A phone stores a portrait shot as landscape pixels tagged "turn 90 degrees clockwise to view"
    (orientation 6): the model gets the portrait, as a photo viewer shows it."""
    from sklearn.datasets import load_sample_images

    spec = PreprocessSpec()
    sensor = Image.fromarray(load_sample_images().images[1]).resize((4032, 3024))
    as_viewed = sensor.transpose(Image.Transpose.ROTATE_270)
    stored = _tagged(sensor, "JPEG", orientation=6)
    assert decode_image(stored, spec=spec).size == (378, 504)  # scaled, then turned
    got, want = bytes_to_uint8(stored, spec), bytes_to_uint8(_tagged(as_viewed, "JPEG"), spec)
    assert (got.int() - want.int()).abs().max() <= 2
    # portrait: black bars left and right, the photo from the top row to the bottom one
    assert got[0, :, 0].max() == 0 and got[0, :, -1].max() == 0 and got[0, 0].max() > 0 and got[0, -1].max() > 0


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_orientation_tags_of_other_formats_are_followed(fmt):
    img = Image.new("L", (60, 30), 0)
    img.paste(255, (0, 0, 20, 30))  # white on the left third
    buf = io.BytesIO()
    tags = Image.Exif()
    tags[0x0112] = 8  # turn 90 degrees counter-clockwise to view: the white third ends at the bottom
    img.save(buf, fmt, exif=tags if fmt == "TIFF" else tags.tobytes())
    viewed = decode_image(buf.getvalue()).convert("L")  # WebP decodes as RGB
    assert viewed.size == (30, 60)
    assert viewed.getpixel((15, 55)) == 255 and viewed.getpixel((15, 5)) == 0


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own, when it opens the file
def test_a_damaged_exif_block_leaves_the_photo_as_stored():
    img = Image.new("L", (60, 30), 0)
    img.paste(255, (0, 0, 20, 30))
    damaged = _tagged(img, "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff garbage")
    plain = _tagged(img, "JPEG")
    assert torch.equal(bytes_to_uint8(damaged, PreprocessSpec()), bytes_to_uint8(plain, PreprocessSpec()))
