"""Raw image-folder datasets: the sample export, validation, processing and loading.

Raw layout (what users bring, tracked by ``data.dvc``)::

    data/raw/<split>/<label>/<name>      one image per file: PNG, JPEG, WebP or BMP
    data/raw/<split>.csv                 optional, header ``filepath,label`` (paths relative
                                         to data/raw): lists the split's images instead
                                         of its folder

Processed layout (what ``process_data`` writes and ``train`` reads)::

    data/processed/<split>_images.npy    uint8, shape (N, H, W, C), memory-mappable;
                                         splits train, val (raw or carved) and test
    data/processed/<split>_labels.npy    int64 class indices, shape (N,)
    data/processed/metadata.json         classes, image shape, counts, how val was made,
                                         normalisation stats

One module per stage of the data:

- ``sample``: the sample digits exported into the raw layout (``imgpipe data sample``);
- ``raw``: reading and validating the raw layout;
- ``val_split``: the validation split, the raw one or one carved from train;
- ``process``: decoding it on all cores into the processed layout (``process_data``);
- ``processed``: the processed format itself, the only module that names its files
  and metadata keys; it writes them for ``process`` and reads them for ``train``.

This package never imports torch: processing stays light and starts fast.
"""

from imgpipe.data.process import process_dataset
from imgpipe.data.processed import ProcessedData, Split, load_processed
from imgpipe.data.sample import encode_png_gray, export_sample_digits

__all__ = [
    "ProcessedData",
    "Split",
    "encode_png_gray",
    "export_sample_digits",
    "load_processed",
    "process_dataset",
]
