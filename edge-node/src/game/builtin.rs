//! Games built into the edge node, rendered in software straight into I420.
//!
//! They exist so that a node can serve a playable stream without a GPU or a game install (demos,
//! tests, benchmarks): a ship on an arena that the player steers with WASD/arrow keys, relative
//! mouse motion or a gamepad stick, while asteroids orbit, the grid scrolls, a bar sweeps and a
//! frame counter ticks, so a frozen or stuttering stream is obvious at a glance.
//!
//! The simulation is deterministic: the same input events applied before the same frame numbers
//! give the same picture, which is what the tests rely on. Key codes are the browser's
//! `KeyboardEvent.keyCode` numbers (W 87, A 65, S 83, D 68, arrows 37 to 40).
//!
//! Rendering only fills whole rows with `slice::fill` / `copy_from_slice` and draws small
//! sprites, so a 1920x1080 frame costs well under a millisecond on one core.

use super::frame::I420Frame;
use nearpath_protocol::input::{InputEvent, MAX_PADS};
use thiserror::Error;

/// Titles a `{ type = "builtin" }` game entry may use: `arena` (a dark scrolling grid) and
/// `testpattern` (colour bars). Both run the same ship game on top.
pub const TITLES: &[&str] = &["arena", "testpattern"];

/// Whether `title` names a built-in game (for validating the node's configuration at startup).
pub fn is_builtin(title: &str) -> bool {
    TITLES.contains(&title)
}

/// Why a built-in game could not be started.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BuiltinError {
    /// The configured title is not one of [`TITLES`] (a configuration mistake of the operator).
    #[error("no built-in game is called {title:?} (built-in games: {known})")]
    UnknownTitle {
        /// The title asked for.
        title: String,
        /// The titles that exist, comma separated.
        known: String,
    },
    /// The session asked for a size I420 cannot represent (odd or zero).
    #[error("built-in games render at even, non-zero sizes, not {width}x{height}")]
    BadDimensions {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
}

/// Browser key codes the game reacts to.
mod keys {
    pub const LEFT: [u16; 2] = [65, 37]; // A, ArrowLeft
    pub const UP: [u16; 2] = [87, 38]; // W, ArrowUp
    pub const RIGHT: [u16; 2] = [68, 39]; // D, ArrowRight
    pub const DOWN: [u16; 2] = [83, 40]; // S, ArrowDown
}

/// Held-direction bits.
const HELD_LEFT: u8 = 1;
const HELD_RIGHT: u8 = 2;
const HELD_UP: u8 = 4;
const HELD_DOWN: u8 = 8;

/// Gamepad stick values closer to centre than this are treated as centred (sticks rest a
/// little off zero).
const STICK_DEADZONE: i32 = 4096;
/// Positions are kept in 1/256 pixel so slow stick deflections still move the ship.
const FIX: i64 = 256;

/// A colour in limited-range BT.601 YUV (what decoders assume without VUI signalling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Yuv(u8, u8, u8);

const WHITE: Yuv = Yuv(235, 128, 128);
const YELLOW: Yuv = Yuv(210, 16, 146);
const CYAN: Yuv = Yuv(170, 166, 16);
const GREEN: Yuv = Yuv(145, 54, 34);
const MAGENTA: Yuv = Yuv(106, 202, 222);
const RED: Yuv = Yuv(81, 90, 240);
const BLUE: Yuv = Yuv(41, 240, 110);
const ORANGE: Yuv = Yuv(150, 44, 200);
const GREY: Yuv = Yuv(110, 128, 128);

/// Which background is drawn under the game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scene {
    Arena,
    TestPattern,
}

/// One built-in game instance: its state and the frame it renders into.
pub struct BuiltinGame {
    scene: Scene,
    width: u32,
    height: u32,
    /// Frames simulated so far (the number drawn as the counter).
    frame_no: u64,
    /// Ship centre in 1/256 pixel.
    ship_x: i64,
    ship_y: i64,
    /// Ship half-size in pixels (the mouse wheel changes it).
    ship_half: i64,
    held: u8,
    /// The last state of each gamepad (any pad steers the one ship).
    pads: [PadState; MAX_PADS],
    firing_mouse: bool,
    /// Collisions of the ship with an asteroid so far, and whether it overlaps one now.
    hits: u64,
    touching: bool,
    /// The ship's speed in the last step, in 1/1000 of full (unboosted) speed (0..=1000).
    thrust_milli: u32,
    /// The pad that sent input last (0 before any): the one a hit rumbles.
    last_pad: u8,
    /// Accumulated wheel motion not yet turned into a size step.
    wheel_acc: i32,
    /// Colour bar rows for the test pattern, built once.
    bars: Option<BarRows>,
    out: I420Frame,
}

/// What the game keeps of one gamepad.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PadState {
    /// Left stick x and y.
    stick: [i16; 2],
    /// Left and right analog triggers.
    triggers: [u16; 2],
    /// Button A (standard button 0) held: the ship fires.
    firing: bool,
}

/// One row of the colour bars in each plane.
struct BarRows {
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl std::fmt::Debug for BuiltinGame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinGame")
            .field("scene", &self.scene)
            .field("size", &(self.width, self.height))
            .field("frame_no", &self.frame_no)
            .field("ship", &self.ship_position())
            .finish()
    }
}

impl BuiltinGame {
    /// Starts the built-in game called `title` at the given size, ship in the centre, frame 0.
    pub fn new(title: &str, width: u32, height: u32) -> Result<Self, BuiltinError> {
        let scene = match title {
            "arena" => Scene::Arena,
            "testpattern" => Scene::TestPattern,
            _ => {
                return Err(BuiltinError::UnknownTitle {
                    title: title.to_owned(),
                    known: TITLES.join(", "),
                })
            }
        };
        let out = I420Frame::black(width, height)
            .map_err(|_| BuiltinError::BadDimensions { width, height })?;
        let bars = (scene == Scene::TestPattern).then(|| BarRows::new(width));
        Ok(Self {
            scene,
            width,
            height,
            frame_no: 0,
            ship_x: i64::from(width) * FIX / 2,
            ship_y: i64::from(height) * FIX / 2,
            ship_half: (i64::from(height) / 40).max(4),
            held: 0,
            pads: [PadState::default(); MAX_PADS],
            firing_mouse: false,
            hits: 0,
            touching: false,
            thrust_milli: 0,
            last_pad: 0,
            wheel_acc: 0,
            bars,
            out,
        })
    }

    /// Renders at a new size from the next frame on, the game going on where it was: the
    /// ship keeps its place relative to the arena (and its size relative to the height), the
    /// frame counter and held input carry over. A size I420 cannot hold is refused and changes
    /// nothing.
    pub fn resize(&mut self, width: u32, height: u32) -> Result<(), BuiltinError> {
        let out = I420Frame::black(width, height)
            .map_err(|_| BuiltinError::BadDimensions { width, height })?;
        let scale = |v: i64, new: u32, old: u32| v * i64::from(new) / i64::from(old.max(1));
        self.ship_x = scale(self.ship_x, width, self.width);
        self.ship_y = scale(self.ship_y, height, self.height);
        self.ship_half = scale(self.ship_half, height, self.height).max(4);
        self.width = width;
        self.height = height;
        self.bars = (self.scene == Scene::TestPattern).then(|| BarRows::new(width));
        self.out = out;
        self.clamp_ship();
        Ok(())
    }

    /// Frame width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Frame height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Frames simulated so far.
    pub fn frame_number(&self) -> u64 {
        self.frame_no
    }

    /// Pad `pad`'s analog triggers (left, right) as the game last saw them; zero for a pad
    /// never seen or out of range.
    pub fn pad_triggers(&self, pad: usize) -> [u16; 2] {
        self.pads.get(pad).map_or([0, 0], |p| p.triggers)
    }

    /// How much faster the ship moves than at rest, in 1/65535: the deepest right trigger of
    /// any pad (0 none, 65535 double speed).
    pub fn boost(&self) -> u16 {
        self.pads.iter().map(|p| p.triggers[1]).max().unwrap_or(0)
    }

    /// Collisions of the ship with an asteroid so far, counted when an overlap begins (a ship
    /// resting inside an asteroid's path counts once per pass).
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// The pad that sent input last (0 before any gamepad input): the one a hit rumbles.
    pub fn last_pad(&self) -> u8 {
        self.last_pad
    }

    /// Where asteroid `i` (0..5) is at `frame_no`, and its radius, in pixels.
    fn asteroid(&self, i: u32, frame_no: u64) -> (f64, f64, f64) {
        let (w, h) = (f64::from(self.width), f64::from(self.height));
        let (cx, cy) = (w / 2.0, h / 2.0);
        let unit = w.min(h);
        let fi = f64::from(i);
        let radius = unit * (0.16 + 0.065 * fi);
        let speed = 0.011 + 0.004 * fi;
        let dir = if i.is_multiple_of(2) { 1.0 } else { -1.0 };
        let angle = dir * speed * frame_no as f64 + fi * 1.3;
        (
            cx + radius * angle.cos(),
            cy + radius * angle.sin(),
            (unit * (0.018 + 0.006 * fi)).max(2.0),
        )
    }

    /// Counts a hit when the ship starts to overlap an asteroid.
    fn check_collision(&mut self) {
        let (sx, sy) = (
            self.ship_x as f64 / FIX as f64,
            self.ship_y as f64 / FIX as f64,
        );
        let half = self.ship_half as f64;
        let touching = (0..ASTEROIDS).any(|i| {
            let (x, y, r) = self.asteroid(i, self.frame_no);
            (x - sx).hypot(y - sy) < r + half
        });
        if touching && !self.touching {
            self.hits += 1;
        }
        self.touching = touching;
    }

    /// The ship's centre in whole pixels, origin top left.
    pub fn ship_position(&self) -> (i32, i32) {
        // Positions are clamped to the frame, so they always fit.
        (
            i32::try_from(self.ship_x / FIX).unwrap_or(i32::MAX),
            i32::try_from(self.ship_y / FIX).unwrap_or(i32::MAX),
        )
    }

    /// Applies one input event. Mouse motion moves the ship at once; keys and the stick set a
    /// velocity that [`BuiltinGame::step`] integrates. Events the game has no use for
    /// (keyframe requests, pings, unknown keys) are ignored.
    pub fn apply_input(&mut self, event: &InputEvent) {
        match *event {
            InputEvent::Key { code, down } => {
                let bit = if keys::LEFT.contains(&code) {
                    HELD_LEFT
                } else if keys::RIGHT.contains(&code) {
                    HELD_RIGHT
                } else if keys::UP.contains(&code) {
                    HELD_UP
                } else if keys::DOWN.contains(&code) {
                    HELD_DOWN
                } else {
                    return;
                };
                if down {
                    self.held |= bit;
                } else {
                    self.held &= !bit;
                }
            }
            InputEvent::MouseMove { dx, dy } => {
                self.ship_x = self.ship_x.saturating_add(i64::from(dx) * FIX);
                self.ship_y = self.ship_y.saturating_add(i64::from(dy) * FIX);
                self.clamp_ship();
            }
            InputEvent::MouseButton { down, .. } => self.firing_mouse = down,
            InputEvent::Wheel { dy, .. } => {
                // One notch (120) grows or shrinks the ship by a step; wheel up (negative dy
                // in browsers) grows it.
                self.wheel_acc = self.wheel_acc.saturating_sub(i32::from(dy));
                let steps = self.wheel_acc / 120;
                self.wheel_acc %= 120;
                let max_half = (i64::from(self.height) / 8).max(4);
                self.ship_half = (self.ship_half + i64::from(steps) * 2).clamp(4, max_half);
                self.clamp_ship();
            }
            InputEvent::Gamepad {
                pad,
                axes,
                triggers,
                buttons,
            } => {
                // The decoder keeps pads in range; an out-of-range one is ignored, not a panic.
                if let Some(p) = self.pads.get_mut(usize::from(pad)) {
                    self.last_pad = pad;
                    *p = PadState {
                        stick: [axes[0], axes[1]],
                        triggers,
                        firing: buttons & 1 != 0,
                    };
                }
            }
            InputEvent::KeyframeRequest | InputEvent::Ping { .. } => {}
        }
    }

    /// Advances the simulation by one frame.
    pub fn step(&mut self) {
        // Full speed crosses the frame height in three seconds at 60 fps.
        let speed = (i64::from(self.height) * FIX / 180).max(FIX);
        let mut vx = 0i64;
        let mut vy = 0i64;
        if self.held & HELD_LEFT != 0 {
            vx -= speed;
        }
        if self.held & HELD_RIGHT != 0 {
            vx += speed;
        }
        if self.held & HELD_UP != 0 {
            vy -= speed;
        }
        if self.held & HELD_DOWN != 0 {
            vy += speed;
        }
        let axis = |a: i16| {
            let a = i32::from(a);
            if a.abs() < STICK_DEADZONE {
                0
            } else {
                i64::from(a) * speed / 32767
            }
        };
        for p in &self.pads {
            vx += axis(p.stick[0]);
            vy += axis(p.stick[1]);
        }
        // A right trigger boosts: up to double speed at full pull.
        let boost = i64::from(self.boost());
        vx += vx * boost / 65535;
        vy += vy * boost / 65535;
        let (x0, y0) = (self.ship_x, self.ship_y);
        self.ship_x += vx;
        self.ship_y += vy;
        self.clamp_ship();
        self.frame_no += 1;
        // What the ship actually moved (a wall stops it, and its engine with it).
        let moved = ((self.ship_x - x0) as f64).hypot((self.ship_y - y0) as f64);
        self.thrust_milli = ((moved / speed as f64) * 1000.0).clamp(0.0, 1000.0) as u32;
        self.check_collision();
    }

    /// How fast the ship moved in the last step, 0.0 (still) to 1.0 (full speed or more): what
    /// the engine sound follows.
    pub fn thrust(&self) -> f32 {
        self.thrust_milli as f32 / 1000.0
    }

    /// Steps until [`BuiltinGame::frame_number`] is `frame_no` (no-op if it is already past),
    /// so the world keeps real-time speed when frames are dropped.
    pub fn advance_to(&mut self, frame_no: u64) {
        while self.frame_no < frame_no {
            self.step();
        }
    }

    fn clamp_ship(&mut self) {
        let h = self.ship_half * FIX;
        let max_x = (i64::from(self.width) * FIX - h).max(h);
        let max_y = (i64::from(self.height) * FIX - h).max(h);
        self.ship_x = self.ship_x.clamp(h, max_x);
        self.ship_y = self.ship_y.clamp(h, max_y);
    }

    /// Paints the sync flash over the rendered frame: the whole top-right quarter white, so a
    /// player can find it by sampling a few pixels there (`/play` does, to measure the offset
    /// between the beep it hears and the flash it shows). Called for the frames that fall in a
    /// beep ([`super::audio::flash_on`]).
    pub fn draw_flash(&mut self) {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut c = Canvas::new(&mut self.out, w, h);
        c.rect((w / 2) as i32, 0, w as i32, (h / 2) as i32, WHITE);
    }

    /// The frame as last rendered (black before the first [`BuiltinGame::render`]).
    pub fn frame(&self) -> &I420Frame {
        &self.out
    }

    /// Draws the current state and returns the frame.
    pub fn render(&mut self) -> &I420Frame {
        let (w, h) = (self.width as usize, self.height as usize);
        let frame_no = self.frame_no;
        let (sx, sy) = self.ship_position();
        let ship_half = self.ship_half as i32;
        let firing = self.firing_mouse || self.pads.iter().any(|p| p.firing);
        let triggers: Vec<u16> = self.pads.iter().map(|p| p.triggers[1]).collect();
        let asteroids: Vec<(f64, f64, f64)> =
            (0..ASTEROIDS).map(|i| self.asteroid(i, frame_no)).collect();
        let scene = self.scene;
        let bars = self.bars.as_ref();
        let mut c = Canvas::new(&mut self.out, w, h);

        match (scene, bars) {
            (Scene::TestPattern, Some(bars)) => c.test_pattern(bars),
            _ => c.arena_background(frame_no),
        }

        // Asteroids orbit the centre at different radii and speeds.
        for (i, (x, y, r)) in asteroids.into_iter().enumerate() {
            let colour = [GREY, ORANGE, CYAN, MAGENTA, GREEN][i];
            c.disc(x as i32, y as i32, r as i32, colour);
        }

        // Each pad's right trigger as a white bar, bottom left, above the sweeping bar.
        for (pad, level) in triggers.into_iter().enumerate() {
            let (x0, x1, y0, y1) = trigger_bar(w, h, pad, level);
            c.rect(x0, y0, x1, y1, WHITE);
        }

        // A bar sweeps along the bottom once every two seconds (at 60 fps).
        let bar_w = (w / 48).max(2);
        let bar_x = (frame_no % 120) as usize * w.saturating_sub(bar_w) / 119;
        let bar_h = (h / 30).max(2);
        c.rect(
            bar_x as i32,
            (h - bar_h) as i32,
            (bar_x + bar_w) as i32,
            h as i32,
            WHITE,
        );

        // The player's ship: a triangle pointing up, with a beam while firing.
        if firing {
            let beam = (ship_half / 4).max(1);
            c.rect(sx - beam, 0, sx + beam, sy - ship_half, RED);
        }
        c.ship(sx, sy, ship_half, if firing { RED } else { YELLOW });

        // The frame counter, top left.
        let digit_h = (h / 18).max(10) as i32;
        c.number(digit_h / 2, digit_h / 2, digit_h, frame_no, WHITE);

        &self.out
    }
}

/// Asteroids on the arena.
const ASTEROIDS: u32 = 5;

/// Where pad `pad`'s right-trigger bar is drawn at `level` (0..=65535) in a `w`x`h` frame:
/// `(x0, x1, y0, y1)`, empty at 0 and a quarter of the height tall at full pull.
pub fn trigger_bar(w: usize, h: usize, pad: usize, level: u16) -> (i32, i32, i32, i32) {
    let bw = (w / 40).max(4);
    let x0 = 4 + pad * (bw + 4);
    let bottom = h.saturating_sub((h / 30).max(2) + 2);
    let tall = (h / 4) * usize::from(level) / 65535;
    (
        x0 as i32,
        (x0 + bw) as i32,
        bottom.saturating_sub(tall) as i32,
        bottom as i32,
    )
}

impl BarRows {
    fn new(width: u32) -> Self {
        let w = width as usize;
        let colours = [WHITE, YELLOW, CYAN, GREEN, MAGENTA, RED, BLUE];
        let y = (0..w).map(|x| colours[x * 7 / w].0).collect();
        let u = (0..w / 2).map(|x| colours[x * 14 / w].1).collect();
        let v = (0..w / 2).map(|x| colours[x * 14 / w].2).collect();
        Self { y, u, v }
    }
}

/// Drawing primitives over the three planes of one frame. All coordinates are in luma pixels
/// and clipped to the frame, so sprites may hang off the edges.
struct Canvas<'a> {
    y: &'a mut [u8],
    u: &'a mut [u8],
    v: &'a mut [u8],
    w: usize,
    h: usize,
}

impl<'a> Canvas<'a> {
    fn new(frame: &'a mut I420Frame, w: usize, h: usize) -> Self {
        let (y, u, v) = frame.planes_mut();
        Self { y, u, v, w, h }
    }

    fn arena_background(&mut self, frame_no: u64) {
        let (w, h) = (self.w, self.h);
        let grid = (h / 12).max(8);
        // The grid scrolls down and right by a pixel a frame: global motion, like a game camera.
        let offset = (frame_no % grid as u64) as usize;
        for (row, line) in self.y.chunks_exact_mut(w).enumerate() {
            let on_grid = (row + grid - offset).is_multiple_of(grid);
            if on_grid {
                line.fill(70);
            } else {
                // A vertical gradient keeps the background from being one flat colour.
                line.fill(20 + (row * 28 / h) as u8);
                let mut x = (grid - offset) % grid;
                while x < w {
                    line[x] = 70;
                    x += grid;
                }
            }
        }
        self.u.fill(136);
        self.v.fill(122);
    }

    fn test_pattern(&mut self, bars: &BarRows) {
        let (w, h) = (self.w, self.h);
        let bars_end = h * 2 / 3;
        for (row, line) in self.y.chunks_exact_mut(w).enumerate() {
            if row < bars_end {
                line.copy_from_slice(&bars.y);
            } else {
                line.fill(16);
            }
        }
        let cw = w / 2;
        for (row, (lu, lv)) in self
            .u
            .chunks_exact_mut(cw)
            .zip(self.v.chunks_exact_mut(cw))
            .enumerate()
        {
            if row * 2 < bars_end {
                lu.copy_from_slice(&bars.u);
                lv.copy_from_slice(&bars.v);
            } else {
                lu.fill(128);
                lv.fill(128);
            }
        }
    }

    /// Fills luma pixels `[x0, x1)` of `row` and the chroma under them (clipped).
    fn span(&mut self, row: i32, x0: i32, x1: i32, c: Yuv) {
        if row < 0 || row as usize >= self.h {
            return;
        }
        let x0 = x0.clamp(0, self.w as i32) as usize;
        let x1 = x1.clamp(0, self.w as i32) as usize;
        if x0 >= x1 {
            return;
        }
        let row = row as usize;
        self.y[row * self.w + x0..row * self.w + x1].fill(c.0);
        // Chroma is shared by 2x2 luma pixels; paint it on even rows only to do it once.
        if row.is_multiple_of(2) {
            let cw = self.w / 2;
            let base = (row / 2) * cw;
            let (c0, c1) = (x0 / 2, x1.div_ceil(2).min(cw));
            self.u[base + c0..base + c1].fill(c.1);
            self.v[base + c0..base + c1].fill(c.2);
        }
    }

    fn rect(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, c: Yuv) {
        let y0 = y0.max(0);
        let y1 = y1.min(self.h as i32);
        for row in y0..y1 {
            self.span(row, x0, x1, c);
        }
    }

    fn disc(&mut self, cx: i32, cy: i32, r: i32, c: Yuv) {
        let r2 = i64::from(r) * i64::from(r);
        for dy in -r..=r {
            let rest = r2 - i64::from(dy) * i64::from(dy);
            let half = (rest as f64).sqrt() as i32;
            self.span(cy + dy, cx - half, cx + half + 1, c);
        }
    }

    /// A triangle with its apex `half` above the centre and its base `half` below.
    fn ship(&mut self, cx: i32, cy: i32, half: i32, c: Yuv) {
        let tall = 2 * half;
        for i in 0..=tall {
            let spread = i * half / tall.max(1);
            self.span(cy - half + i, cx - spread, cx + spread + 1, c);
        }
    }

    /// Draws `n` in seven-segment digits `digit_h` pixels tall, starting at (x, y).
    fn number(&mut self, x: i32, y: i32, digit_h: i32, n: u64, c: Yuv) {
        // Segment bits: a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
        // f (top left), g (middle).
        const SEGMENTS: [u8; 10] = [
            0b011_1111, 0b000_0110, 0b101_1011, 0b100_1111, 0b110_0110, 0b110_1101, 0b111_1101,
            0b000_0111, 0b111_1111, 0b110_1111,
        ];
        let digits = n.to_string();
        let dw = digit_h / 2;
        let t = (digit_h / 8).max(1);
        let half = digit_h / 2;
        for (i, ch) in digits.bytes().enumerate() {
            let s = SEGMENTS[usize::from(ch - b'0')];
            let x0 = x + i as i32 * (dw + 2 * t);
            let on = |bit: u8| s & (1 << bit) != 0;
            if on(0) {
                self.rect(x0, y, x0 + dw, y + t, c);
            }
            if on(1) {
                self.rect(x0 + dw - t, y, x0 + dw, y + half, c);
            }
            if on(2) {
                self.rect(x0 + dw - t, y + half, x0 + dw, y + digit_h, c);
            }
            if on(3) {
                self.rect(x0, y + digit_h - t, x0 + dw, y + digit_h, c);
            }
            if on(4) {
                self.rect(x0, y + half, x0 + t, y + digit_h, c);
            }
            if on(5) {
                self.rect(x0, y, x0 + t, y + half, c);
            }
            if on(6) {
                self.rect(x0, y + half - t / 2, x0 + dw, y + half - t / 2 + t, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: u16, down: bool) -> InputEvent {
        InputEvent::Key { code, down }
    }

    #[test]
    fn unknown_titles_and_odd_sizes_are_refused() {
        assert!(matches!(
            BuiltinGame::new("doom", 64, 64),
            Err(BuiltinError::UnknownTitle { .. })
        ));
        assert_eq!(
            BuiltinGame::new("arena", 63, 64).unwrap_err(),
            BuiltinError::BadDimensions {
                width: 63,
                height: 64
            }
        );
        assert!(is_builtin("testpattern") && !is_builtin("Arena"));
    }

    #[test]
    fn wasd_and_arrows_move_the_ship_and_release_stops_it() {
        let mut g = BuiltinGame::new("arena", 1280, 720).unwrap();
        let start = g.ship_position();
        assert_eq!(start, (640, 360));
        g.apply_input(&key(68, true)); // D
        for _ in 0..10 {
            g.step();
        }
        let right = g.ship_position();
        assert_eq!(right.1, start.1);
        assert_eq!(
            right.0 - start.0,
            40,
            "720 / 180 = 4 px a frame for 10 frames"
        );
        g.apply_input(&key(68, false));
        g.step();
        assert_eq!(g.ship_position(), right, "released keys stop the ship");
        g.apply_input(&key(38, true)); // ArrowUp
        g.apply_input(&key(37, true)); // ArrowLeft
        g.step();
        assert_eq!(g.ship_position(), (right.0 - 4, right.1 - 4));
        // Unknown keys change nothing.
        g.apply_input(&key(38, false));
        g.apply_input(&key(37, false));
        g.apply_input(&key(13, true));
        g.step();
        assert_eq!(g.ship_position(), (right.0 - 4, right.1 - 4));
    }

    #[test]
    fn the_ship_stays_inside_the_arena() {
        let mut g = BuiltinGame::new("arena", 320, 180).unwrap();
        g.apply_input(&key(65, true));
        g.apply_input(&key(87, true));
        for _ in 0..1000 {
            g.step();
        }
        let (x, y) = g.ship_position();
        assert_eq!((x, y), (4, 4), "clamped to its half-size from the corner");
        g.apply_input(&InputEvent::MouseMove {
            dx: i32::MAX,
            dy: i32::MAX,
        });
        assert_eq!(g.ship_position(), (316, 176));
    }

    #[test]
    fn gamepad_stick_and_mouse_move_the_ship() {
        let mut g = BuiltinGame::new("testpattern", 1280, 720).unwrap();
        g.apply_input(&InputEvent::Gamepad {
            pad: 0,
            axes: [32767, -16384, 0, 0],
            triggers: [0, 0],
            buttons: 0,
        });
        g.step();
        let (x, y) = g.ship_position();
        assert_eq!(x, 644);
        assert!(
            (357..360).contains(&y),
            "half deflection up moves about 2 px, got {y}"
        );
        // Inside the dead zone the stick does nothing.
        g.apply_input(&InputEvent::Gamepad {
            pad: 0,
            axes: [1000, -1000, 0, 0],
            triggers: [0, 0],
            buttons: 0,
        });
        let before = g.ship_position();
        g.step();
        assert_eq!(g.ship_position(), before);
        g.apply_input(&InputEvent::MouseMove { dx: -100, dy: 50 });
        assert_eq!(g.ship_position(), (before.0 - 100, before.1 + 50));
    }

    #[test]
    fn gamepad_2s_trigger_reaches_the_game_boosts_the_ship_and_shows_in_the_picture() {
        let pad2 = |trigger: u16, x: i16| InputEvent::Gamepad {
            pad: 2,
            axes: [x, 0, 0, 0],
            triggers: [0, trigger],
            buttons: 0,
        };
        let mut g = BuiltinGame::new("arena", 320, 180).unwrap();
        let (x0, x1, y0, y1) = trigger_bar(320, 180, 2, u16::MAX);
        let luma = |f: &I420Frame| f.y()[((y0 + y1) / 2 * 320 + (x0 + x1) / 2) as usize];
        assert!(luma(g.render()) < 100, "no bar before the trigger");
        // Pad 2's stick alone moves the ship at normal speed.
        g.apply_input(&pad2(0, 32767));
        let before = g.ship_position().0;
        g.step();
        let normal = g.ship_position().0 - before;
        assert!(normal > 0);
        // Its right trigger is seen, doubles the speed and draws its bar.
        g.apply_input(&pad2(u16::MAX, 32767));
        assert_eq!(g.pad_triggers(2), [0, u16::MAX]);
        assert_eq!(g.pad_triggers(0), [0, 0]);
        assert_eq!(g.boost(), u16::MAX);
        let before = g.ship_position().0;
        g.step();
        assert_eq!(g.ship_position().0 - before, 2 * normal);
        assert!(luma(g.render()) > 200, "pad 2's bar is drawn");
        // Out-of-range pads (which the decoder refuses anyway) are ignored.
        g.apply_input(&InputEvent::Gamepad {
            pad: 9,
            axes: [0; 4],
            triggers: [u16::MAX; 2],
            buttons: 0,
        });
        assert_eq!(g.pad_triggers(9), [0, 0]);
    }

    #[test]
    fn a_ship_in_an_asteroids_path_is_hit_once_per_pass() {
        let mut g = BuiltinGame::new("arena", 160, 96).unwrap();
        // Onto the outer orbit (radius 0.42 x 96 from the centre), right of the centre.
        g.apply_input(&InputEvent::MouseMove { dx: 40, dy: 0 });
        assert_eq!(g.hits(), 0);
        let mut hit_frames = Vec::new();
        for _ in 0..600 {
            let before = g.hits();
            g.step();
            if g.hits() > before {
                hit_frames.push(g.frame_number());
            }
        }
        // The two outer asteroids (laps of 233 and 286 frames) pass over that spot a few times
        // in 600 frames; each pass counts once (the rising edge of the overlap, which lasts
        // several frames), never once a frame.
        assert!((3..=8).contains(&hit_frames.len()), "{hit_frames:?}");
        assert!(
            hit_frames.windows(2).all(|w| w[1] - w[0] > 5),
            "{hit_frames:?}"
        );
    }

    #[test]
    fn same_inputs_give_the_same_pictures_and_input_changes_them() {
        let run = |moves: bool| {
            let mut g = BuiltinGame::new("arena", 160, 96).unwrap();
            let mut frames = Vec::new();
            for i in 0..20 {
                if moves && i == 5 {
                    g.apply_input(&key(83, true));
                }
                g.step();
                frames.push(g.render().clone());
            }
            frames
        };
        let a = run(false);
        assert_eq!(a, run(false), "deterministic");
        let b = run(true);
        assert_eq!(a[4], b[4]);
        assert_ne!(a[10], b[10], "the moved ship shows in the picture");
        assert_ne!(a[10], a[11], "the world moves on its own");
    }

    #[test]
    fn advance_to_catches_up_dropped_frames() {
        let mut a = BuiltinGame::new("arena", 64, 64).unwrap();
        let mut b = BuiltinGame::new("arena", 64, 64).unwrap();
        a.apply_input(&key(40, true));
        b.apply_input(&key(40, true));
        a.advance_to(7);
        for _ in 0..7 {
            b.step();
        }
        assert_eq!(a.frame_number(), 7);
        assert_eq!(a.ship_position(), b.ship_position());
        a.advance_to(3);
        assert_eq!(a.frame_number(), 7, "never goes back");
    }

    #[test]
    fn resizing_keeps_the_game_going_with_the_ship_in_the_same_place_of_the_arena() {
        let mut g = BuiltinGame::new("arena", 1280, 720).unwrap();
        g.apply_input(&key(68, true));
        g.advance_to(30);
        g.render();
        let (x, y) = g.ship_position();
        assert!(x > 640, "the ship moved right: {x}");
        g.resize(1920, 1080).unwrap();
        assert_eq!((g.width(), g.height(), g.frame_number()), (1920, 1080, 30));
        let (nx, ny) = g.ship_position();
        assert!(
            (nx - x * 3 / 2).abs() <= 1 && (ny - y * 3 / 2).abs() <= 1,
            "{x},{y} -> {nx},{ny}"
        );
        let f = g.render();
        assert_eq!((f.width(), f.height()), (1920, 1080));
        // Held input carries over: the ship keeps moving right.
        g.advance_to(31);
        assert!(g.ship_position().0 > nx);
        // A size I420 cannot hold changes nothing.
        assert!(g.resize(641, 360).is_err());
        assert_eq!((g.width(), g.height()), (1920, 1080));
        g.resize(16, 16).unwrap();
        let f = g.render();
        assert_eq!((f.width(), f.height()), (16, 16));
    }

    #[test]
    fn renders_every_size_without_panicking() {
        for (w, h) in [(2, 2), (16, 2), (2, 16), (162, 90), (1920, 1080)] {
            for title in TITLES {
                let mut g = BuiltinGame::new(title, w, h).unwrap();
                g.apply_input(&InputEvent::MouseButton {
                    button: 0,
                    down: true,
                });
                g.apply_input(&InputEvent::Wheel { dx: 0, dy: -1200 });
                g.step();
                let f = g.render();
                assert_eq!((f.width(), f.height()), (w, h));
            }
        }
    }

    #[test]
    fn thrust_follows_what_the_ship_moved() {
        let mut g = BuiltinGame::new("arena", 640, 360).unwrap();
        g.step();
        assert_eq!(g.thrust(), 0.0);
        g.apply_input(&key(keys::RIGHT[0], true));
        g.step();
        assert!(g.thrust() > 0.99, "{}", g.thrust());
        // Against the right wall the ship stops, and so does its engine.
        for _ in 0..400 {
            g.step();
        }
        assert_eq!(g.thrust(), 0.0);
        g.apply_input(&key(keys::RIGHT[0], false));
        g.apply_input(&key(keys::LEFT[0], true));
        g.step();
        assert!(g.thrust() > 0.99);
    }

    #[test]
    fn the_flash_whitens_the_top_right_quarter_only() {
        let mut g = BuiltinGame::new("arena", 64, 32).unwrap();
        g.render();
        g.draw_flash();
        let y = g.frame().y();
        assert_eq!(y[5 * 64 + 40], WHITE.0);
        assert_eq!(y[15 * 64 + 63], WHITE.0);
        assert_ne!(y[20 * 64 + 40], WHITE.0, "the bottom half is not flashed");
    }
}
