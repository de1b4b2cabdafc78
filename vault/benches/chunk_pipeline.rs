//! The chunk pipeline stage by stage on 256 MiB of mixed data, so the slowest
//! stage is visible: FastCDC cutting, keyed BLAKE3 ids, zstd, SM4-GCM alone
//! (the engine in use, normally libgcrypt, beside the portable software
//! path), and the whole pipeline (cut, id, compress and seal) on one core
//! and on all.
//!
//! Run: `cargo bench --profile dev --workspace --bench chunk_pipeline`
//! (`TRIAD_BENCH_MIB` changes the data size.)

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;
use vault::chunk::{self, ChunkId};
use vault::crypto::{sm4_engine, sm4_gcm_open, sm4_gcm_seal, software_seal};
use vault::DatasetKey;

/// Mixed content: a quarter each of random bytes (media, archives), text,
/// structured records and sparse data (zeros with some noise).
fn mixed_data(mib: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let quarter = (mib << 20) / 4;
    let mut out = Vec::with_capacity(mib << 20);
    let mut random = vec![0u8; quarter];
    rng.fill_bytes(&mut random);
    out.extend_from_slice(&random);
    let words = [
        "record",
        "department",
        "citizen",
        "permit",
        "2026",
        "approved",
        "archive",
        "的",
        "政务",
        "数据",
    ];
    while out.len() < 2 * quarter {
        let w = words[(rng.next_u32() as usize) % words.len()];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.next_u32() % 12 == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(2 * quarter);
    let mut id = 0u64;
    while out.len() < 3 * quarter {
        id += 1;
        let line = format!(
            "{{\"id\":{id},\"amount\":{},\"region\":\"zjk-{}\",\"ok\":true}}\n",
            rng.next_u32() % 100000,
            rng.next_u32() % 40
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(3 * quarter);
    let mut sparse = vec![0u8; quarter];
    for _ in 0..quarter / 512 {
        let at = (rng.next_u64() as usize) % quarter;
        sparse[at] = rng.next_u32() as u8;
    }
    out.extend_from_slice(&sparse);
    out
}

fn bench(c: &mut Criterion) {
    let mib: usize = std::env::var("TRIAD_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let data = mixed_data(mib);
    let keys = DatasetKey::generate().derive();
    let cuts = chunk::cut(&data);
    let pieces: Vec<&[u8]> = cuts
        .iter()
        .map(|c| &data[c.offset..c.offset + c.len])
        .collect();
    let ids: Vec<ChunkId> = pieces.iter().map(|p| ChunkId::of(&keys, p)).collect();
    let compressed: Vec<Vec<u8>> = pieces
        .iter()
        .map(|p| zstd::bulk::compress(p, 3).unwrap())
        .collect();
    let stored: usize = compressed
        .iter()
        .zip(&pieces)
        .map(|(c, p)| c.len().min(p.len()))
        .sum();
    eprintln!(
        "data {} MiB in {} chunks (mean {} KiB); zstd-3 stores {:.1}% of it",
        mib,
        cuts.len(),
        data.len() / cuts.len().max(1) / 1024,
        100.0 * stored as f64 / data.len() as f64
    );

    eprintln!("SM4-GCM engine: {:?}", sm4_engine());

    let mut g = c.benchmark_group("chunk_pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("1_fastcdc_cut", |b| b.iter(|| chunk::cut(&data).len()));
    g.bench_function("2_blake3_keyed_ids_1core", |b| {
        b.iter(|| {
            pieces
                .iter()
                .fold(0u8, |acc, p| acc ^ ChunkId::of(&keys, p).0[0])
        })
    });
    g.bench_function("3_zstd3_1core", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|p| zstd::bulk::compress(p, 3).map(|c| c.len()).unwrap_or(0))
                .sum::<usize>()
        })
    });
    g.bench_function("4_sm4_gcm_raw_1core", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|p| {
                    let mut buf = p.to_vec();
                    sm4_gcm_seal(&keys.chunk_seal, &[0u8; 12], b"", &mut buf);
                    buf.len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("4b_sm4_gcm_software_1core", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|p| {
                    let mut buf = p.to_vec();
                    software_seal(&keys.chunk_seal, &[0u8; 12], b"", &mut buf);
                    buf.len()
                })
                .sum::<usize>()
        })
    });
    let sealed: Vec<Vec<u8>> = pieces
        .iter()
        .map(|p| {
            let mut buf = p.to_vec();
            sm4_gcm_seal(&keys.chunk_seal, &[0u8; 12], b"", &mut buf);
            buf
        })
        .collect();
    g.bench_function("4c_sm4_gcm_open_1core", |b| {
        b.iter(|| {
            sealed
                .iter()
                .map(|s| {
                    let mut buf = s.clone();
                    assert!(sm4_gcm_open(&keys.chunk_seal, &[0u8; 12], b"", &mut buf));
                    buf.len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("5_seal_zstd_then_sm4_1core", |b| {
        b.iter(|| {
            pieces
                .iter()
                .zip(&ids)
                .map(|(p, id)| chunk::seal(&keys, *id, p).sealed.len())
                .sum::<usize>()
        })
    });
    g.bench_function("6_whole_pipeline_1core", |b| {
        b.iter(|| {
            chunk::cut(&data)
                .iter()
                .map(|c| {
                    let p = &data[c.offset..c.offset + c.len];
                    let id = ChunkId::of(&keys, p);
                    chunk::seal(&keys, id, p).sealed.len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("7_whole_pipeline_all_cores", |b| {
        b.iter(|| {
            let cuts = chunk::cut(&data);
            cuts.par_iter()
                .map(|c| {
                    let p = &data[c.offset..c.offset + c.len];
                    let id = ChunkId::of(&keys, p);
                    chunk::seal(&keys, id, p).sealed.len()
                })
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
