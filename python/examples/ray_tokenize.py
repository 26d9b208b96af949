"""Tokenize a folder of images with Ray Data and write Parquet (ids per image).

    pip install ".[ray]"
    python python/examples/ray_tokenize.py IMAGES OUT [--size 128] [--workers 2]

On a cluster: start Ray on every node (`ray start --head` on one, `ray start --address=HEAD:6379`
on the others), put the images on storage every node reads (NFS, S3: `s3://bucket/train`), and run
this script on the head node with `--address auto`; Ray spreads the batches over all workers.
"""

import argparse

import ray

from coda.ray import TokenizeBatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("images")
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="tokenizer actors (leave CPUs for reading)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--address", default=None, help="an existing cluster (auto), else a local one")
    args = ap.parse_args()
    ray.init(address=args.address)
    ds = ray.data.read_images(args.images, include_paths=True, mode="RGB")
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"size": args.size, "threads": 1},
        batch_size=args.batch,
        batch_format="numpy",
        concurrency=args.workers,
    )
    ds.write_parquet(args.out)


if __name__ == "__main__":
    main()
