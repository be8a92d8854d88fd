//! The pre-encoded stream: a realistic frame size sequence over arbitrary payload bytes.

use super::*;

/// Why a [`StreamShape`] cannot be turned into frames.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("--fps must be between 1 and 1000, got {0}")]
    Fps(u32),
    #[error("--idr-every-s must be positive and finite, got {0}")]
    IdrInterval(f64),
    #[error("an IDR every {gop} frames leaves no P frames: raise --idr-every-s")]
    NoPFrames { gop: usize },
    #[error(
        "an IDR of {idr} bytes every {gop} frames leaves {left} bytes for {p_frames} P frames at {kbps} kbit/s \
         (at least {min} each): raise --kbps or lower --idr-bytes"
    )]
    Budget {
        idr: u32,
        gop: usize,
        kbps: u32,
        p_frames: usize,
        left: i64,
        min: u32,
    },
    #[error("frames of {0} bytes exceed the protocol's {MAX_VIDEO_FRAME}-byte limit")]
    TooLarge(u32),
}

/// A pre-encoded stream: frame sizes of one group of pictures (IDR first) over shared payload
/// bytes. Sessions start at different places in the group, so their IDRs do not coincide.
///
/// The bytes are shaped as one H.264 NAL unit in Annex B (a start code, an IDR or non-IDR slice
/// header byte, then a body with no zero byte, so no start code by chance): the native relay
/// does not look at them, but the WebRTC path payloads them as H.264, and arbitrary bytes could
/// read as NAL units it drops (an access unit delimiter, filler) or holds back (SPS, PPS).
#[derive(Debug, Clone)]
pub struct FramePlan {
    pub(super) sizes: Vec<u32>,
    /// IDR frames: a prefix of this.
    pub(super) payload: Bytes,
    /// P frames: a prefix of this.
    pub(super) p_payload: Bytes,
    pub(super) fps: u32,
}

/// Annex B start code and NAL header of an IDR slice (nal_ref_idc 3, type 5).
const IDR_NAL: [u8; 5] = [0, 0, 0, 1, 0x65];
/// Annex B start code and NAL header of a non-IDR slice (nal_ref_idc 2, type 1).
const P_NAL: [u8; 5] = [0, 0, 0, 1, 0x41];

/// The smallest P frame the plan makes (a nearly static scene still costs a few packets).
pub(super) const MIN_P_FRAME: u32 = 500;

impl FramePlan {
    pub fn new(shape: &StreamShape, seed: u64) -> Result<FramePlan, PlanError> {
        if shape.fps == 0 || shape.fps > 1000 {
            return Err(PlanError::Fps(shape.fps));
        }
        if !(shape.idr_every_s.is_finite() && shape.idr_every_s > 0.0) {
            return Err(PlanError::IdrInterval(shape.idr_every_s));
        }
        let gop = ((shape.fps as f64 * shape.idr_every_s).round() as usize).max(1);
        let p_frames = gop - 1;
        if p_frames == 0 {
            return Err(PlanError::NoPFrames { gop });
        }
        let per_frame = shape.kbps as f64 * 1000.0 / 8.0 / shape.fps as f64;
        let total = (per_frame * gop as f64).round() as i64;
        let left = total - shape.idr_bytes as i64;
        if left < p_frames as i64 * MIN_P_FRAME as i64 {
            return Err(PlanError::Budget {
                idr: shape.idr_bytes,
                gop,
                kbps: shape.kbps,
                p_frames,
                left,
                min: MIN_P_FRAME,
            });
        }
        // P frames vary by +-30% around their mean, as a moving scene does; the weights are
        // scaled so the group adds up to the bitrate exactly.
        let mut state = seed | 1;
        let weights: Vec<f64> = (0..p_frames)
            .map(|_| 0.7 + 0.6 * unit(&mut state))
            .collect();
        let scale = left as f64 / weights.iter().sum::<f64>();
        let mut sizes = vec![shape.idr_bytes];
        sizes.extend(
            weights
                .iter()
                .map(|w| ((w * scale).round() as u32).max(MIN_P_FRAME)),
        );
        // Rounding leaves a few bytes over or under: the largest P frame absorbs them.
        let sum: i64 = sizes.iter().map(|&s| s as i64).sum();
        let biggest = (1..sizes.len()).max_by_key(|&i| sizes[i]).unwrap_or(1);
        sizes[biggest] = (sizes[biggest] as i64 + total - sum).max(MIN_P_FRAME as i64) as u32;
        let max = sizes.iter().copied().max().unwrap_or(0);
        if max as usize > MAX_VIDEO_FRAME {
            return Err(PlanError::TooLarge(max));
        }
        let body: Vec<u8> = (0..max)
            .map(|_| ((unit(&mut state) * 255.0) as u8).saturating_add(1))
            .collect();
        let nal = |head: [u8; 5]| {
            let mut v = head.to_vec();
            v.extend_from_slice(&body[..(max as usize).saturating_sub(head.len())]);
            Bytes::from(v)
        };
        Ok(FramePlan {
            sizes,
            payload: nal(IDR_NAL),
            p_payload: nal(P_NAL),
            fps: shape.fps,
        })
    }

    /// Frames from one IDR to the next.
    pub fn gop(&self) -> usize {
        self.sizes.len()
    }

    pub fn fps(&self) -> u32 {
        self.fps
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / self.fps as u64)
    }

    /// When frame `k` is due, from the start of the stream.
    pub fn due(&self, k: u64) -> Duration {
        Duration::from_nanos((k as u128 * 1_000_000_000 / self.fps as u128) as u64)
    }

    /// Mean payload bytes per frame.
    pub fn mean_bytes(&self) -> f64 {
        self.sizes.iter().map(|&s| s as f64).sum::<f64>() / self.sizes.len() as f64
    }

    /// Mean P-frame payload bytes.
    pub fn mean_p_bytes(&self) -> f64 {
        self.sizes[1..].iter().map(|&s| s as f64).sum::<f64>() / (self.sizes.len() - 1) as f64
    }

    /// Average bitrate in kbit/s.
    pub fn kbps(&self) -> f64 {
        self.mean_bytes() * 8.0 * self.fps as f64 / 1000.0
    }

    /// Frame `k` of a stream that starts `phase` frames into the group: (keyframe, payload).
    pub fn frame(&self, k: u64, phase: u64) -> (bool, Bytes) {
        let i = ((k + phase) % self.sizes.len() as u64) as usize;
        let bytes = if i == 0 {
            &self.payload
        } else {
            &self.p_payload
        };
        (i == 0, bytes.slice(..self.sizes[i] as usize))
    }
}

/// xorshift64*: uniform in [0, 1). Deterministic, so every run sends the same sizes.
pub(super) fn unit(state: &mut u64) -> f64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_hits_the_bitrate_with_an_idr_per_group() {
        let plan = FramePlan::new(&shape(), 7).unwrap();
        assert_eq!(plan.gop(), 120);
        // 10 Mbit/s at 60 fps is 20833 bytes a frame; the group adds up to it exactly.
        let total: u64 = plan.sizes.iter().map(|&s| s as u64).sum();
        assert_eq!(total, (10_000_000.0f64 / 8.0 / 60.0 * 120.0).round() as u64);
        assert!((plan.kbps() - 10_000.0).abs() < 1.0, "{}", plan.kbps());
        let (key, idr) = plan.frame(0, 0);
        assert!(key);
        assert_eq!(idr.len(), 60_000);
        // One Annex B NAL unit each: an IDR slice, then non-IDR slices, and no start code
        // inside (the WebRTC path payloads these bytes as H.264).
        assert_eq!(idr[..5], IDR_NAL);
        assert!(!idr[5..].contains(&0));
        let (_, p) = plan.frame(1, 0);
        assert_eq!(p[..5], P_NAL);
        assert!(!p[5..].contains(&0));
        assert!(!plan.frame(1, 0).0);
        assert!(plan.frame(120, 0).0 && plan.frame(100, 20).0);
        // P frames vary around their mean but stay well below the IDR.
        let mean = plan.mean_p_bytes();
        let (lo, hi) = (
            plan.sizes[1..].iter().min().unwrap(),
            plan.sizes[1..].iter().max().unwrap(),
        );
        assert!(
            *lo as f64 >= 0.65 * mean && (*hi as f64) <= 1.35 * mean,
            "{lo}..{hi} around {mean}"
        );
        assert!(hi > lo, "sizes vary");
        // Same seed, same sequence: every run sends the same bytes.
        assert_eq!(FramePlan::new(&shape(), 7).unwrap().sizes, plan.sizes);
    }

    #[test]
    fn plan_refuses_shapes_it_cannot_make() {
        assert_eq!(
            FramePlan::new(&StreamShape { fps: 0, ..shape() }, 1).unwrap_err(),
            PlanError::Fps(0)
        );
        assert!(matches!(
            FramePlan::new(
                &StreamShape {
                    idr_every_s: f64::NAN,
                    ..shape()
                },
                1
            ),
            Err(PlanError::IdrInterval(_))
        ));
        assert!(matches!(
            FramePlan::new(
                &StreamShape {
                    idr_every_s: 0.01,
                    ..shape()
                },
                1
            ),
            Err(PlanError::NoPFrames { gop: 1 })
        ));
        // 1 Mbit/s cannot carry a 60 KB IDR every 2 s plus 119 P frames.
        assert!(matches!(
            FramePlan::new(
                &StreamShape {
                    kbps: 200,
                    ..shape()
                },
                1
            ),
            Err(PlanError::Budget { .. })
        ));
    }

    #[test]
    fn frames_are_due_on_the_frame_clock() {
        let plan = FramePlan::new(&shape(), 1).unwrap();
        assert_eq!(plan.due(0), Duration::ZERO);
        assert_eq!(plan.due(60), Duration::from_secs(1));
        assert_eq!(plan.due(1).as_micros(), 16_666);
    }
}
