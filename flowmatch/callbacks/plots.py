"""Pictures of samples: 2-D scatter panels, image grids and captioned image grids rendered to an RGB array (for MLflow images and PNG files)."""

import io

import numpy as np


def scatter_figure(panels: list[tuple[str, np.ndarray]], lim: float = 4.5) -> np.ndarray:
    """Side-by-side 2-D scatter plots rendered to an RGB uint8 array (first two coordinates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) images with C in {1, 3}, values roughly in [-1, 1], as one uint8 RGB grid."""
    n, c, h, w = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    pixels = np.clip((images + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=1)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i].transpose(1, 2, 0)
    return grid


def labelled_grid(cells: list[list[np.ndarray]], titles: list[list[str]], caption: str = "", row_labels: list[str] | None = None,
                  cell_inches: float = 0.55, wrap: int = 30) -> np.ndarray:
    """A grid of uint8 RGB pictures (``cells[row][col]``, each H x W x 3 of any size) with a title over each (wrapped at
    ``wrap`` characters), a label per row and a caption on top, rendered to an RGB uint8 array (pixels drawn unsmoothed)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows, ncols = len(cells), max(len(r) for r in cells)
    aspect = max(c.shape[1] / c.shape[0] for r in cells for c in r)  # width / height of the widest picture
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell_inches * aspect * 1.6 + 0.6, nrows * cell_inches * 1.6 * 1.45 + 0.4),
                             squeeze=False)
    for i, row in enumerate(axes):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells[i]):
                ax.axis("off")
                continue
            ax.imshow(cells[i][j], interpolation="nearest")
            ax.set_title(textwrap.fill(titles[i][j], wrap), fontsize=6)
            for side in ax.spines.values():
                side.set_visible(False)
        if row_labels:
            row[0].set_ylabel(row_labels[i], fontsize=7)
    if caption:
        fig.suptitle(caption, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
