//! Raw video frames in I420 (planar YUV 4:2:0), the format every frame source produces and
//! every encoder consumes.

use thiserror::Error;

/// A frame in I420 layout: the full-resolution Y plane, then the U and V planes at half width
/// and half height, all tightly packed in one buffer (stride = width), which is also the byte
/// layout an external frame source writes to its stdout.
#[derive(Clone, PartialEq, Eq)]
pub struct I420Frame {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

/// Why a frame could not be made with the requested size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// I420 needs even dimensions (chroma is subsampled 2x2), and at least 2x2 pixels.
    #[error("I420 frames need even, non-zero dimensions, got {width}x{height}")]
    BadDimensions {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// The buffer does not hold exactly one frame.
    #[error("an I420 frame of {width}x{height} needs {expected} bytes, got {got}")]
    BadLength {
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// `width * height * 3 / 2`.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

impl I420Frame {
    /// Bytes in one frame of this size: `width * height * 3 / 2`, or `None` for dimensions I420
    /// cannot represent (odd or zero) or whose size overflows `usize`.
    pub fn byte_len(width: u32, height: u32) -> Option<usize> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            return None;
        }
        let luma = (width as usize).checked_mul(height as usize)?;
        luma.checked_add(luma / 2)
    }

    /// A black frame (Y 16, U and V 128: black in the limited range decoders assume).
    pub fn black(width: u32, height: u32) -> Result<Self, FrameError> {
        let len =
            Self::byte_len(width, height).ok_or(FrameError::BadDimensions { width, height })?;
        let luma = width as usize * height as usize;
        let mut data = vec![128u8; len];
        data[..luma].fill(16);
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Wraps a buffer holding exactly one frame in I420 layout.
    pub fn from_vec(width: u32, height: u32, data: Vec<u8>) -> Result<Self, FrameError> {
        let expected =
            Self::byte_len(width, height).ok_or(FrameError::BadDimensions { width, height })?;
        if data.len() != expected {
            return Err(FrameError::BadLength {
                width,
                height,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The whole buffer (Y, then U, then V).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// The whole buffer, writable, for sources that fill it in place (e.g. reading a pipe).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Gives the buffer back so it can be reused for a later frame.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    fn luma_len(&self) -> usize {
        self.width as usize * self.height as usize
    }

    /// The Y plane (stride = width).
    pub fn y(&self) -> &[u8] {
        &self.data[..self.luma_len()]
    }

    /// The U plane (stride = width / 2).
    pub fn u(&self) -> &[u8] {
        let l = self.luma_len();
        &self.data[l..l + l / 4]
    }

    /// The V plane (stride = width / 2).
    pub fn v(&self) -> &[u8] {
        let l = self.luma_len();
        &self.data[l + l / 4..]
    }

    /// All three planes, writable at once (renderers draw luma and chroma together).
    pub fn planes_mut(&mut self) -> (&mut [u8], &mut [u8], &mut [u8]) {
        let l = self.luma_len();
        let (y, chroma) = self.data.split_at_mut(l);
        let (u, v) = chroma.split_at_mut(l / 4);
        (y, u, v)
    }
}

impl std::fmt::Debug for I420Frame {
    // The pixel buffer is megabytes; print only its shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I420Frame")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("bytes", &self.data.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_planes() {
        assert_eq!(I420Frame::byte_len(1920, 1080), Some(3_110_400));
        assert_eq!(I420Frame::byte_len(1280, 720), Some(1_382_400));
        assert_eq!(I420Frame::byte_len(3, 2), None);
        assert_eq!(I420Frame::byte_len(0, 2), None);
        let mut f = I420Frame::black(4, 2).unwrap();
        assert_eq!(f.y(), &[16; 8]);
        assert_eq!(f.u(), &[128; 2]);
        assert_eq!(f.v(), &[128; 2]);
        let (y, u, v) = f.planes_mut();
        y[0] = 1;
        u[1] = 2;
        v[0] = 3;
        assert_eq!(
            f.as_bytes(),
            &[1, 16, 16, 16, 16, 16, 16, 16, 128, 2, 3, 128]
        );
    }

    #[test]
    fn from_vec_checks_length_and_dimensions() {
        assert!(I420Frame::from_vec(4, 2, vec![0; 12]).is_ok());
        assert_eq!(
            I420Frame::from_vec(4, 2, vec![0; 11]),
            Err(FrameError::BadLength {
                width: 4,
                height: 2,
                expected: 12,
                got: 11
            })
        );
        assert_eq!(
            I420Frame::from_vec(5, 2, vec![0; 15]),
            Err(FrameError::BadDimensions {
                width: 5,
                height: 2
            })
        );
    }
}
