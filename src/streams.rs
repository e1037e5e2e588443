//! Byte streams produced as they are read: what blocking code writes (a tar of artifacts, a
//! BuildInfo with its logs read from disk), what the cluster's database holds (a central log).
//! No HTTP here: the server turns them into response bodies (`crate::body`).

use futures_util::stream;

/// A stream of byte chunks (a body, a log) that something produces as it is read.
pub type ByteStream = futures_util::stream::BoxStream<'static, Result<Vec<u8>, std::io::Error>>;

/// What blocking code writes, as a stream: `produce` runs on a blocking thread with a buffered
/// writer whose 64 KiB chunks are yielded as they come, so memory stays flat however much it
/// writes. An error (the reader going away included) is passed to `failed` and ends the stream
/// with it.
pub(crate) fn blocking_stream(
    produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'static,
    failed: impl FnOnce(&std::io::Error) + Send + 'static,
) -> ByteStream {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter { tx });
        let result = produce(&mut w).and_then(|()| std::io::Write::flush(&mut w));
        if let Err(e) = result {
            failed(&e);
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    Box::pin(stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// Sends what a blocking writer produces to an async body, in 64 KiB chunks.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(buf.to_vec()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
