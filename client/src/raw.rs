//! A bare frame connection: WebSocket in, frames out. The SDK's driver uses
//! it, and so do tests that need to send exactly the bytes they mean
//! (malformed frames included).

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use natter_proto::{Frame, FrameError};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::ClientError;

/// Largest WebSocket message the client accepts from a server.
const MAX_INCOMING: usize = 16 * 1024 * 1024;

/// What arrives from the server.
#[derive(Debug)]
pub enum Incoming {
    Frame(Frame),
    /// The server closed the WebSocket with this code and reason.
    Close {
        code: u16,
        reason: String,
    },
    /// A binary message that is not a frame.
    BadFrame(FrameError),
}

/// One WebSocket to a natter gateway.
pub struct Connection {
    ws: WebSocketStream<TcpStream>,
}

impl Connection {
    /// Connects to `ws://{server}/sub`, optionally from a given source address.
    pub async fn connect(server: &str, local: Option<IpAddr>) -> Result<Connection, ClientError> {
        let addr: SocketAddr = match server.parse() {
            Ok(addr) => addr,
            Err(_) => tokio::net::lookup_host(server)
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?
                .next()
                .ok_or_else(|| ClientError::Connect(format!("{server} resolves to nothing")))?,
        };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| ClientError::Connect(e.to_string()))?;
        if let Some(ip) = local {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| ClientError::Connect(format!("bind {ip}: {e}")))?;
        }
        let stream = socket.connect(addr).await.map_err(ClientError::from_io)?;
        stream
            .set_nodelay(true)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let url = format!("ws://{server}/sub");
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_INCOMING))
            .max_frame_size(Some(MAX_INCOMING))
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(|e| ClientError::Handshake(e.to_string()))?;
        Ok(Connection { ws })
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.send_bytes(frame.encode()).await
    }

    /// Sends arbitrary bytes as one binary WebSocket message.
    pub async fn send_bytes(&mut self, bytes: impl Into<Bytes>) -> Result<(), ClientError> {
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .map_err(|e| ClientError::Io(e.to_string()))
    }

    /// Sends a text WebSocket message (which natter does not accept).
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.ws
            .send(WsMessage::Text(text.into()))
            .await
            .map_err(|e| ClientError::Io(e.to_string()))
    }

    /// The next frame or close; `None` when the connection ended without a close.
    pub async fn recv(&mut self) -> Result<Option<Incoming>, ClientError> {
        loop {
            match self.ws.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Io(e.to_string())),
                Some(Ok(WsMessage::Binary(bytes))) => {
                    return Ok(Some(match Frame::decode(&bytes, MAX_INCOMING) {
                        Ok(frame) => Incoming::Frame(frame),
                        Err(e) => Incoming::BadFrame(e),
                    }))
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Some(Incoming::Close { code, reason }));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Closes the WebSocket politely.
    pub async fn close(&mut self) {
        let _ = self.ws.close(None).await;
    }
}
