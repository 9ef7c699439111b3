//! From an event to a message: who gets it, what it says, and the RFC 5322 text it becomes
//! (kept in the database with its record; also sent over SMTP or written as a `.eml` file when
//! configured).

use std::path::{Path, PathBuf};

use shopmesh_contracts::{OrderChange, OrderSnapshot, UserRegistered};
use shopmesh_db::TxConn;
use shopmesh_events::Envelope;
use shopmesh_events::consumer::{Handler, HandlerError, HandlerFuture};

use crate::store;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `Name <address>`.
    pub to: String,
    /// The subject line.
    pub subject: String,
    /// Plain text.
    pub body: String,
}

/// Header values come from customers (names): no line breaks or other controls may pass.
fn header_safe(value: &str) -> String {
    value.chars().filter(|c| !c.is_control()).collect()
}

fn money(minor: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", minor / 100, (minor % 100).abs())
}

fn order_lines(order: &OrderSnapshot) -> String {
    order
        .lines
        .iter()
        .map(|l| format!("  {} × {} ({})\n", l.quantity, l.name, l.sku))
        .collect()
}

/// The message for an order event, to `to` named `name`.
pub fn order_message(change: OrderChange, order: &OrderSnapshot, to: &str, name: &str) -> Message {
    let total = money(order.total, &order.currency);
    let lines = order_lines(order);
    let id = order.order_id.hyphenated().to_string();
    let short = &id[..8];
    // The texts name the order by its id.
    let order = &id;
    let (subject, text) = match change {
        OrderChange::Placed => (
            format!("We received your order {short}"),
            format!(
                "Your order {order} is placed and its items are set aside for you.\n\n{lines}\nTotal: {total}\n\nPay for it to complete your purchase."
            ),
        ),
        OrderChange::Paid => (
            format!("Order {short} confirmed"),
            format!(
                "Thank you: your payment for order {order} was received and the order is confirmed.\n\n{lines}\nTotal paid: {total}\n"
            ),
        ),
        OrderChange::Cancelled => (
            format!("Order {short} cancelled"),
            format!("Your order {order} is cancelled. Anything you paid ({total}) is refunded.\n"),
        ),
        OrderChange::Expired => (
            format!("Order {short} expired"),
            format!(
                "Your order {order} was not paid in time and has expired; its items are back on the shelf.\n"
            ),
        ),
    };
    Message {
        to: format!("{} <{}>", header_safe(name), header_safe(to)),
        subject,
        body: format!("Hello {},\n\n{text}\n-- shopmesh\n", header_safe(name)),
    }
}

/// The welcome message for a new account.
pub fn welcome(email: &str, name: &str) -> Message {
    Message {
        to: format!("{} <{}>", header_safe(name), header_safe(email)),
        subject: "Welcome to shopmesh".to_owned(),
        body: format!(
            "Hello {},\n\nyour account {} is ready. Happy shopping!\n\n-- shopmesh\n",
            header_safe(name),
            header_safe(email)
        ),
    }
}

/// `message` as an RFC 5322 text (CRLF line ends), the event's id as its `Message-ID`.
pub fn render(from: &str, event: &Envelope, message: &Message) -> String {
    let id = event.id.hyphenated();
    let date = OffsetDateTime::now_utc()
        .format(&Rfc2822)
        .unwrap_or_default();
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: <{id}@shopmesh.local>\r\nX-Shopmesh-Event: {kind}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}",
        from = header_safe(from),
        to = message.to,
        subject = header_safe(&message.subject),
        kind = event.kind,
        body = message.body.replace('\n', "\r\n"),
    )
}

/// Writes `text` as `<dir>/<event id>.eml` (whole or not at all). Keyed by the event, so
/// writing it again for a redelivered event leaves one file.
pub fn write_eml(dir: &Path, event: &Envelope, text: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let id = event.id.hyphenated().to_string();
    let path = dir.join(format!("{id}.eml"));
    let tmp = dir.join(format!(".{id}.eml.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// An SMTP client.
pub type Smtp = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;

/// A client for `url` (`smtp://[user:password@]host[:port]`, port 25 by default): plain SMTP
/// to a relay on the internal network (lettre's URL parser needs a TLS stack we do not build).
pub fn smtp(url: &str) -> Result<Smtp, String> {
    let bad = |why: &str| format!("notifications.smtp_url {url:?}: {why}");
    let rest = url
        .strip_prefix("smtp://")
        .ok_or_else(|| bad("expected smtp://[user:password@]host[:port]"))?
        .trim_end_matches('/');
    let (credentials, server) = match rest.rsplit_once('@') {
        Some((userinfo, server)) => {
            let (user, password) = userinfo
                .split_once(':')
                .ok_or_else(|| bad("credentials must be user:password"))?;
            (Some((user.to_owned(), password.to_owned())), server)
        }
        None => (None, rest),
    };
    let (host, port) = match server.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad("bad port"))?),
        None => (server, 25),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let mut builder = Smtp::builder_dangerous(host).port(port);
    if let Some((user, password)) = credentials {
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user, password,
        ));
    }
    Ok(builder.build())
}

/// Sends `message` through SMTP. Its `Message-ID` is the event's, so a message sent again for a
/// redelivered event (a crash between sending and recording) is recognisably the same one.
/// Returns the `Message-ID` and the message exactly as it went out.
pub async fn send_smtp(
    smtp: &Smtp,
    from: &str,
    event: &Envelope,
    message: &Message,
) -> Result<(String, String), HandlerError> {
    use lettre::AsyncTransport;
    let id = format!("<{}@shopmesh.local>", event.id.hyphenated());
    let email = lettre::Message::builder()
        .from(
            header_safe(from)
                .parse()
                // Our configuration: fixable, so worth retrying.
                .map_err(|e| HandlerError::Retry(format!("sender: {e}")))?,
        )
        .to(message
            .to
            .parse()
            .map_err(|e| HandlerError::Reject(format!("recipient: {e}")))?)
        .subject(header_safe(&message.subject))
        .message_id(Some(id.clone()))
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(message.body.clone())
        .map_err(|e| HandlerError::Reject(format!("building the message: {e}")))?;
    let text = String::from_utf8_lossy(&email.formatted()).into_owned();
    smtp.send(email)
        .await
        .map_err(|e| HandlerError::Retry(format!("sending through SMTP: {e}")))?;
    Ok((id, text))
}

/// The consumer's handler: keeps the customer directory, makes one message per event, sends it
/// (SMTP) or writes it (a `.eml` file) when so configured, and records it with its text.
pub struct Mailer {
    /// Where `.eml` files also go (without SMTP), when configured. Unset, a message is only
    /// kept in the database: creating a file per message cost more CPU than the rest of the
    /// service (issue 9: ~1.5 ms per purchase on ext4).
    pub dir: Option<PathBuf>,
    /// The SMTP server, when configured.
    pub smtp: Option<Smtp>,
    /// The sender.
    pub from: String,
    /// Test only: a marker file; freeze once after writing a message, before recording it.
    pub failpoint: Option<PathBuf>,
}

impl Mailer {
    async fn message_for(
        &self,
        tx: &mut TxConn,
        event: &Envelope,
    ) -> Result<Option<Message>, HandlerError> {
        if let Some(user) = event.decode::<UserRegistered>()? {
            store::remember_customer(tx, user.user_id, &user.email, &user.name).await?;
            return Ok(Some(welcome(&user.email, &user.name)));
        }
        let Some((change, order)) = OrderSnapshot::decode(event)? else {
            return Ok(None);
        };
        // The user's registration comes on another stream and may not be here yet: try later.
        let (email, name) = store::customer(tx, order.user_id).await?.ok_or_else(|| {
            HandlerError::Retry(format!("customer {} is not known yet", order.user_id))
        })?;
        Ok(Some(order_message(change, &order, &email, &name)))
    }
}

impl Handler for Mailer {
    /// A message kept in the database, or also written as a file, is rewritten under the same
    /// key by a repeat; one sent over SMTP would be sent twice.
    fn may_repeat(&self) -> bool {
        self.smtp.is_none()
    }

    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            let Some(message) = self.message_for(tx, event).await? else {
                return Ok(());
            };
            // Where it went besides the database (`smtp:<Message-ID>`, a file, or nowhere: ""),
            // and its text as it went.
            let (went, text) = match (&self.smtp, &self.dir) {
                (Some(smtp), _) => {
                    let (id, text) = send_smtp(smtp, &self.from, event, &message).await?;
                    (format!("smtp:{id}"), text)
                }
                (None, Some(dir)) => {
                    let text = render(&self.from, event, &message);
                    let path = write_eml(dir, event, &text)
                        .map_err(|e| HandlerError::Retry(format!("writing the message: {e}")))?;
                    (path.display().to_string(), text)
                }
                (None, None) => (String::new(), render(&self.from, event, &message)),
            };
            if let Some(marker) = &self.failpoint
                && !marker.exists()
            {
                let _ = std::fs::write(marker, b"fired");
                tracing::warn!(went = %went, "failpoint pause_after_mail: frozen before recording the message");
                std::future::pending::<()>().await;
            }
            store::record(
                tx,
                &store::Sent {
                    event_id: event.id,
                    kind: &event.kind,
                    to: &message.to,
                    subject: &message.subject,
                    went: &went,
                    text: &text,
                },
            )
            .await?;
            metrics::counter!("notifications_sent_total", "type" => event.kind.clone())
                .increment(1);
            tracing::debug!(event = %event.id, kind = %event.kind, to = %message.to, "message written");
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An SMTP server that accepts everything and hands over each message's DATA.
    async fn fake_smtp() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 fake ESMTP\r\n").await;
                    let mut data: Option<String> = None;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(body) = &mut data {
                            if line == "." {
                                let _ = tx.send(std::mem::take(body));
                                data = None;
                                let _ = write.write_all(b"250 queued\r\n").await;
                            } else {
                                body.push_str(&line);
                                body.push('\n');
                            }
                            continue;
                        }
                        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 fake\r\n",
                            "DATA" => {
                                data = Some(String::new());
                                b"354 go ahead\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"250 ok\r\n",
                        };
                        let _ = write.write_all(reply).await;
                    }
                });
            }
        });
        (format!("smtp://127.0.0.1:{port}"), rx)
    }

    #[tokio::test]
    async fn a_message_goes_out_through_smtp_with_the_event_as_its_message_id() {
        let (url, mut received) = fake_smtp().await;
        let smtp = smtp(&url).expect("client");
        let event = Envelope {
            id: uuid::Uuid::now_v7(),
            position: 1,
            kind: "user.registered".to_owned(),
            version: 1,
            occurred_at: "2026-11-22T00:00:00Z".to_owned(),
            aggregate_id: "u".to_owned(),
            trace_id: None,
            payload: json!({}),
        };
        let message = welcome("cat@example.com", "Cat");
        let (id, text) = send_smtp(&smtp, "shopmesh <shop@shopmesh.local>", &event, &message)
            .await
            .expect("sent");
        let data = received.recv().await.expect("a message");
        // What is kept is what went out (the server sees it line by line, without the CRs, and
        // the client ends the data with a line break of its own).
        assert_eq!(
            text.replace("\r\n", "\n").trim_end(),
            data.trim_end(),
            "kept: {text}"
        );
        assert!(data.contains("To: Cat <cat@example.com>"), "{data}");
        assert!(data.contains("Subject: Welcome to shopmesh"), "{data}");
        assert!(data.contains(&format!("Message-ID: {id}")), "{data}");
        assert!(id.contains(&event.id.hyphenated().to_string()));
        assert!(
            data.contains("your account cat@example.com is ready"),
            "{data}"
        );
    }

    #[test]
    fn smtp_urls_are_checked() {
        assert!(smtp("smtp://mail.internal").is_ok());
        assert!(smtp("smtp://user:secret@relay:587").is_ok());
        for bad in [
            "mail.internal:25",
            "smtps://relay:465",
            "smtp://:25",
            "smtp://relay:x",
            "smtp://user@relay",
        ] {
            assert!(smtp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_values_cannot_smuggle_headers() {
        let m = welcome("a@example.com", "Eve\r\nBcc: all@example.com");
        assert_eq!(m.to, "EveBcc: all@example.com <a@example.com>");
        assert!(!m.to.contains('\n'));
    }

    #[test]
    fn order_messages_say_what_happened_with_lines_and_total() {
        let order: OrderSnapshot = serde_json::from_value(json!({
            "order_id": "0194a1b2-0000-7000-8000-000000000000",
            "user_id": "0194a1b2-0000-7000-8000-000000000001", "status": "paid",
            "total": 6980, "currency": "EUR", "card_last4": "4242",
            "lines": [{"product_id": "0194a1b2-0000-7000-8000-000000000002", "name": "Mug",
                "sku": "MUG-1", "quantity": 2, "unit_price": 3490}]}))
        .expect("an order.paid payload");
        let m = order_message(OrderChange::Paid, &order, "cat@example.com", "Cat");
        assert_eq!(m.subject, "Order 0194a1b2 confirmed");
        assert!(m.body.contains("2 × Mug (MUG-1)"), "{}", m.body);
        assert!(m.body.contains("69.80 EUR"), "{}", m.body);
    }
}
